"""Localization (ROME's causal tracing; Hase et al., 2023, "Does Localization Inform Editing?"): tracing a known
fact, the layer sweep (edit success against tracing effect per layer) and the five editing problems. The
measurements are in ``harness.tracing`` and ``harness.problems``."""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from .. import problems
from ..editing import edited
from .base import Measurement

if TYPE_CHECKING:
    from ..data.case import EditCase
    from ..data.known_facts import KnownFact
    from ..editors.base import Editor
    from ..session import HarnessSession
    from ..timing import PhaseTimer

TRACE = "causal tracing (ROME): P(answer | noised subject, clean state restored) - P(answer | noised subject)"
SWEEP = {"tracing_effect": TRACE + ", hidden (residual) kind, mean over facts",
         "edit_success": problems.PROTOCOL + ": rewrite score of error injection, mean over facts",
         "r2_tracing": "OLS R^2 of edit success on [1, tracing effect] over (fact, layer)",
         "r2_layer": "OLS R^2 of edit success on one-hot(layer) over (fact, layer)",
         "r2_both": "OLS R^2 of edit success on [one-hot(layer), tracing effect]"}


def causal_trace(session: HarnessSession, fact: KnownFact, timer: PhaseTimer) -> Measurement:
    """The tracing effect of every layer for the residual stream, MLP and attention (``harness.tracing``)."""
    tracer = session.tracer
    with timer.phase("trace"):
        result = tracer.trace(fact.prompt, fact.subject, fact.attribute)
    metrics = result.metrics()
    info = {"prompt": fact.prompt, "answer": result.answer, "subject_range": result.subject_range,
            "window": result.window, "noise": tracer.noise, "samples": tracer.samples,
            "embedding_std": tracer.sigma}
    return Measurement(metrics, {k: TRACE for k in metrics}, info)


def sweep_unsupported(session: HarnessSession, editor_name: str, window: int) -> str | None:
    """Why ``editor_name`` cannot be swept with windows of ``window`` layers (e.g. ROME edits one layer), or None."""
    return problems.sweep_unsupported(session.new_editor(editor_name), window)


def layer_sweep(session: HarnessSession, editor_name: str, window: int, timer: PhaseTimer) -> Measurement:
    """Each known case (``--sweep-facts``) edited at each swept layer (``--sweep-layers``) by a fresh instance of
    ``editor_name`` that the sweep owns; edit success against the tracing effect per layer (R^2)."""
    editor = session.new_editor(editor_name)
    lm = session.lm

    def edit_at_layer(ed: Editor, case: EditCase) -> contextlib.AbstractContextManager:
        return edited(lm, ed, [case])

    sweep = problems.LayerSweep(lm, editor, edit_at_layer, session.trace_case, window=window,
                                progress=print if session.options.progress else None)
    with timer.phase("sweep"):
        result = sweep.run(session.known_cases(session.options.sweep_facts), session.sweep_layers())
    info = {"editor": editor_name, "window": window, "facts": result.case_ids, "layers": result.layers}
    return Measurement(result.metrics(), dict(SWEEP), info)


def editing_problem(session: HarnessSession, editor: Editor, case: EditCase, problem: str, timer: PhaseTimer
                    ) -> Measurement:
    """One of Hase et al.'s five editing problems for ``case``: rewrite, paraphrase and neighbourhood scores and
    their harmonic mean (``harness.problems``); the model is restored after."""
    lm = session.lm
    metrics, info = problems.run_problem(lm, case, problem, session.tracer,
                                         lambda request: edited(lm, editor, [request], timer))
    return Measurement(metrics, {k: problems.PROTOCOL for k in metrics}, info)
