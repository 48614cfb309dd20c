"""Locality (ROME paper, CounterFact; MEND/EasyEdit, zsRE): against the unedited model, neighbourhood success,
distribution drift on general text and QA locality after an edit (the measurements: ``harness.locality``)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..editing import edited
from ..locality import PROTOCOLS, answer_argmax, distribution_drift, neighbour_wins, qa_locality, retained
from ..metrics.counterfact import PROTOCOLS as CF
from .base import Measurement
from .single import counterfact

if TYPE_CHECKING:
    from ..data.case import EditCase
    from ..editors.base import Editor
    from ..session import HarnessSession
    from ..timing import PhaseTimer

_CF_KEYS = ("efficacy_success", "neighborhood_success", "neighborhood_magnitude", "locality_acc")


def locality(session: HarnessSession, editor: Editor, case: EditCase, timer: PhaseTimer) -> Measurement:
    """Edit ``case``; measure neighbourhood success (``neighborhood_retained``: over the neighbours the unedited
    model knew), ``kl_unrelated`` / ``top1_changed`` on general text and QA locality; restore."""
    lm = session.lm
    model, tok = lm.model, lm.tokenizer
    ref = session.drift_reference()
    metrics: dict[str, Any] = {}
    protocols = dict(PROTOCOLS)
    has_cf = case.target_true is not None
    with timer.phase("evaluate"):
        cf_pre = counterfact(session, case) if has_cf else {}
        wins_pre = neighbour_wins(model, tok, case)
        qa_pre = answer_argmax(model, tok, case.locality) if case.locality else None
    with edited(lm, editor, [case], timer) as edit:
        with timer.phase("evaluate"):
            cf_post = counterfact(session, case, edit) if has_cf else {}
            wins_post = neighbour_wins(model, tok, case, prefix=edit.prompt_prefix)
            qa_post = answer_argmax(model, tok, case.locality, prefix=edit.prompt_prefix) if case.locality else None
        with timer.phase("drift"):
            metrics.update(distribution_drift(model, tok, ref, prefix=edit.prompt_prefix))
    for k in _CF_KEYS:
        if cf_post.get(k) is not None:
            metrics[k] = cf_post[k]
            metrics[f"{k}_pre"] = cf_pre[k]
            protocols[k] = protocols[f"{k}_pre"] = CF[k]
    if wins_pre:
        metrics["neighborhood_retained"] = retained(wins_pre, wins_post)
    if qa_pre is not None and qa_post is not None:
        metrics.update(qa_locality(qa_pre, qa_post))
    protocols["drift_positions"] = f"predicted positions of the general texts ({session.ppl_corpus_name()})"
    return Measurement(metrics, protocols, dict(edit.info))
