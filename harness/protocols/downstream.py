"""Downstream ability after editing (lm-eval on the in-memory model): the accuracy drop after one edit, and the
perplexity-accuracy correlation over the states of a sequential run on hard cases. The session's evaluator caches
the base-model scores; it raises ``DownstreamUnavailable`` without lm-eval (the suite skips)."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..downstream import StateSeries, downstream_metrics
from ..editing import edited, guarded
from ..sequential import SequentialRun
from ..timing import PhaseTimer
from .base import Measurement

if TYPE_CHECKING:
    from ..data.case import EditCase
    from ..editors.base import Editor
    from ..session import HarnessSession

PROTOCOL = "lm-eval {metric} on the first {limit} examples, zero-shot, harness/downstream/tasks"
CORRELATION = "over the edited states of a sequential run on the hard cases (state 0: base)"
PREFIXED = ", after the edit: the in-context editor's prompt prefix as lm-eval's system instruction"


def downstream_edit(session: HarnessSession, editor: Editor, case: EditCase, timer: PhaseTimer) -> Measurement:
    """``downstream_<task>_before`` (base model, once per session), ``_after`` (with ``case`` edited), ``_drop``."""
    evaluator, o = session.downstream, session.options
    with timer.phase("downstream_base"):
        before = evaluator.base(o.downstream_tasks, o.downstream_limit)
    with edited(session.lm, editor, [case], timer) as edit, timer.phase("downstream"):
        after = evaluator.evaluate(o.downstream_tasks, o.downstream_limit, prefix=edit.prompt_prefix)
    protocols = {f"downstream_{t}_{w}": PROTOCOL.format(metric=s.metric, limit=o.downstream_limit or "all")
                 + (PREFIXED if edit.prompt_prefix and w != "before" else "")
                 for t, s in before.items() for w in ("before", "after", "drop")}
    info = {"edited_case": case.case_id, "chance": {t: s.chance for t, s in before.items()},
            "examples": {t: s.n for t, s in before.items()}}
    return Measurement(downstream_metrics(before, after), protocols, info)


def state_series(session: HarnessSession, editor: Editor, cases: Sequence[EditCase], timer: PhaseTimer
                 ) -> StateSeries:
    """A sequential run of ``cases`` (one edit at a time; the model is restored after), with perplexity and
    downstream accuracy measured on the base model and after every edit. The run is
    :class:`harness.sequential.SequentialRun` (journaled under ``REPORT_DIR/correlation``, never resumed: every
    state must be measured); its perplexity callback is the probe that measures a state."""
    evaluator, o, lm = session.downstream, session.options, session.lm
    series = StateSeries()
    base = evaluator.base(o.downstream_tasks, o.downstream_limit)
    series.add(0, session.base_perplexity().mean_ppl, {t: s.value for t, s in base.items()})

    def probe() -> float:
        with timer.phase("perplexity"):
            ppl = session.perplexity(prefix=run.prompt_prefix).mean_ppl
        with timer.phase("downstream"):
            scores = evaluator.evaluate(o.downstream_tasks, o.downstream_limit, prefix=run.prompt_prefix)
        series.add(len(series.states), ppl, {t: s.value for t, s in scores.items()})
        return ppl

    inner = PhaseTimer(lm.device)        # its "perplexity" phase is the probe, timed above
    run = SequentialRun(lm, editor, cases, perplexity=probe, ppl_base=series.states[0]["ppl"],
                        journal_dir=Path(o.report_dir) / "correlation", batch_size=1, ppl_schedule="every",
                        resume=False, progress=o.progress)
    with guarded(lm, editor, f"the correlation run of {editor.name}"):
        run.run(inner)
    for k, v in inner.seconds.items():
        if k != "perplexity":
            timer.seconds[k] = timer.seconds.get(k, 0.0) + v
    return series


def correlation(session: HarnessSession, editor: Editor, cases: Sequence[EditCase], timer: PhaseTimer
                ) -> Measurement:
    """Spearman and Pearson correlation of perplexity and each task's accuracy over the states of
    :func:`state_series`, and each task's accuracy before the first and after the last edit."""
    series = state_series(session, editor, cases, timer)
    first, last = series.states[0], series.states[-1]
    metrics: dict[str, Any] = {**series.correlations(), "downstream_series": series.to_table(),
                               "ppl_curve": [[s["n_edits"], s["ppl"]] for s in series.states],
                               "n_edits": last["n_edits"]}
    for t in session.options.downstream_tasks:
        metrics[f"downstream_{t}_before"] = first["accuracy"][t]
        metrics[f"downstream_{t}_after"] = last["accuracy"][t]
        metrics[f"downstream_{t}_drop"] = first["accuracy"][t] - last["accuracy"][t]
    protocols = {**{k: CORRELATION for k in metrics if "downstream_" in k and ("spearman" in k or "pearson" in k)},
                 "downstream_series": "per state: n_edits, me-ppl, accuracy per task"}
    info = {"hard_dataset": session.options.hard_dataset, "case_ids": [c.case_id for c in cases]}
    return Measurement(metrics, protocols, info)
