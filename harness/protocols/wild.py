"""Evaluation in the wild (Yang et al., ACL 2025, "The Mirage of Model Editing"): after an edit, does the model
*say* the new answer when it generates on its own (``harness.metrics.wild``), beside the teacher-forced scores that
feed it the answer's tokens? Also the generation metrics of ROME (``harness.metrics.generation``) and KnowEdit's
portability (``harness.metrics.knowedit``). ``before`` / ``after`` are shared with the single-edit protocol; ``wild``
is the WILD suite's protocol."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..editing import edited
from ..metrics.counterfact import PROTOCOLS as CF
from ..metrics.counterfact import counterfact_metrics
from ..metrics.generation import PROTOCOLS as GEN
from ..metrics.generation import generation_metrics
from ..metrics.knowedit import PROTOCOLS as KE
from ..metrics.knowedit import portability, wild_portability
from ..metrics.wild import PROTOCOLS as WILD
from ..metrics.wild import Generation, case_generations, case_metrics, generations_record
from .base import Measurement

if TYPE_CHECKING:
    from ..data.case import EditCase
    from ..editors.base import Edit, Editor
    from ..session import HarnessSession
    from ..timing import PhaseTimer


@dataclass
class Before:
    """What the unedited model did on a case (from the session's once-per-case references)."""

    wild: dict[str, list[Generation]] | None = None
    generation: tuple[dict[str, Any], list[str]] | None = None


def before(session: HarnessSession, case: EditCase, timer: PhaseTimer, *, wild: bool, fluency: bool) -> Before:
    """The unedited model's WILD generations and generation metrics for ``case``: call before the edit."""
    out = Before()
    if wild:
        with timer.phase("wild"):
            out.wild = session.wild_reference(case)
    if fluency:
        with timer.phase("generation"):
            out.generation = session.generation_reference(case)
    return out


def after(session: HarnessSession, case: EditCase, edit: Edit, pre: Before, timer: PhaseTimer
          ) -> tuple[dict[str, Any], dict[str, str], dict[str, Any]]:
    """On the edited model: WILD metrics (against ``pre`` for locality), generation metrics and KnowEdit
    portability. Returns (metrics, protocols, info)."""
    model, tok = session.lm.model, session.lm.tokenizer
    metrics: dict[str, Any] = {}
    protocols: dict[str, str] = {}
    info: dict[str, Any] = {}
    with timer.phase("evaluate"):
        port = portability(model, tok, case, prefix=edit.prompt_prefix)
    metrics.update(port)
    protocols.update({k: KE["portability"] for k in port})
    if pre.wild is not None:
        with timer.phase("wild"):
            post = case_generations(model, tok, case, prefix=edit.prompt_prefix)
            wild_port = wild_portability(model, tok, case, prefix=edit.prompt_prefix)
        wild_pre = case_metrics(case, pre.wild)
        metrics.update(case_metrics(case, post, pre.wild), **wild_port,
                       wild_rewrite_em_pre=wild_pre["wild_rewrite_em"],
                       wild_rewrite_contains_pre=wild_pre["wild_rewrite_contains"])
        protocols.update(WILD, **{k: KE[k] for k in wild_port},
                         wild_rewrite_em_pre=WILD["wild_rewrite_em"] + ", before the edit",
                         wild_rewrite_contains_pre=WILD["wild_rewrite_contains"] + ", before the edit")
        info["wild_answers"] = generations_record(post, 2)
        info["wild_answers_pre"] = generations_record({"rewrite": pre.wild["rewrite"]}, 1)
    if pre.generation is not None:
        with timer.phase("generation"):
            gen, texts = generation_metrics(model, tok, case, vectorizer=session.tfidf(), prefix=edit.prompt_prefix)
        gen_pre = pre.generation[0]
        metrics.update(fluency_pre=gen_pre["fluency"], fluency=gen["fluency"],
                       consistency_pre=gen_pre["consistency"], consistency=gen["consistency"])
        protocols.update(fluency_pre=GEN["fluency"], fluency=GEN["fluency"],
                         consistency_pre=GEN["consistency"], consistency=GEN["consistency"])
        info["generated_text"] = texts[0][:300]
    metrics = {k: v for k, v in metrics.items() if v is not None}
    return metrics, {k: protocols[k] for k in metrics}, info


def wild(session: HarnessSession, editor: Editor, case: EditCase, timer: PhaseTimer) -> Measurement:
    """Teacher-forced scores (EasyEdit's token accuracy; CounterFact's comparisons when the case has a true
    answer) and WILD scores side by side, before (``*_pre``) and after the edit; KnowEdit portability; restore."""
    model, tok = session.lm.model, session.lm.tokenizer
    with timer.phase("evaluate"):
        tf_pre = counterfact_metrics(model, tok, case)
    pre = before(session, case, timer, wild=True, fluency=False)
    with edited(session.lm, editor, [case], timer) as edit:
        with timer.phase("evaluate"):
            tf = counterfact_metrics(model, tok, case, prefix=edit.prompt_prefix)
        metrics, protocols, info = after(session, case, edit, pre, timer)
    metrics.update({**{f"{k}_pre": v for k, v in tf_pre.items()}, **tf})
    protocols.update({**{f"{k}_pre": CF[k] for k in tf_pre}, **{k: CF[k] for k in tf}})
    metrics = {k: v for k, v in metrics.items() if v is not None}
    return Measurement(metrics, {k: protocols[k] for k in metrics}, {**edit.info, **info})
