"""Locality (ROME paper, CounterFact; MEND/EasyEdit, zsRE): against the unedited model, neighbourhood success,
distribution drift on general text and QA locality after an edit (the measurements: ``harness.locality``)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..editing import edited
from ..locality import PROTOCOLS, answer_argmax, distribution_drift, neighbour_wins, qa_locality, retained
from ..metrics.counterfact import PROTOCOLS as CF
from ..metrics.knowedit import PROTOCOLS as KE
from ..metrics.knowedit import grouped_locality, locality_outputs
from ..metrics.wild import PROTOCOLS as WILD
from ..metrics.wild import case_generations, case_metrics
from .base import Measurement
from .single import counterfact, expect_ahead

if TYPE_CHECKING:
    from ..data.case import EditCase
    from ..editors.base import Editor
    from ..session import HarnessSession
    from ..timing import PhaseTimer

_CF_KEYS = ("efficacy_success", "neighborhood_success", "neighborhood_magnitude", "locality_acc")


def locality(session: HarnessSession, editor: Editor, case: EditCase, timer: PhaseTimer) -> Measurement:
    """Edit ``case``; measure neighbourhood success (``neighborhood_retained``: over the neighbours the unedited
    model knew), ``kl_unrelated`` / ``top1_changed`` on general text and QA locality (by KnowEdit group when the
    case has groups), and with ``--wild`` WILD locality (generations unchanged by the edit); restore."""
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
        groups_pre = locality_outputs(model, tok, case) if case.extra.get("locality_groups") else None
    if session.options.wild:
        with timer.phase("wild"):
            wild_pre = session.wild_reference(case)
    expect_ahead(session, editor, case, timer)
    with edited(lm, editor, [case], timer) as edit:
        with timer.phase("evaluate"):
            cf_post = counterfact(session, case, edit) if has_cf else {}
            wins_post = neighbour_wins(model, tok, case, prefix=edit.prompt_prefix)
            qa_post = answer_argmax(model, tok, case.locality, prefix=edit.prompt_prefix) if case.locality else None
            groups_post = (locality_outputs(model, tok, case, prefix=edit.prompt_prefix)
                           if groups_pre is not None else None)
        if session.options.wild:
            with timer.phase("wild"):
                wild = case_metrics(case, case_generations(model, tok, case, prefix=edit.prompt_prefix), wild_pre)
            for k in ("wild_locality", "wild_locality_em", "wild_neighborhood_em"):
                if wild[k] is not None:
                    metrics[k], protocols[k] = wild[k], WILD[k]
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
    if groups_pre is not None and groups_post is not None:
        grouped = grouped_locality(groups_pre, groups_post)
        metrics.update(grouped)
        protocols.update({k: KE["knowedit_locality"] for k in grouped})
    protocols["drift_positions"] = f"predicted positions of the general texts ({session.ppl_corpus_name()})"
    return Measurement(metrics, protocols, dict(edit.info))
