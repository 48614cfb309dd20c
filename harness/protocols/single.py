"""Single edits (ROME paper, CounterFact): edit, score, perplexity after, restore. Also the HardEdit suite's
single hard edits."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..editing import edited
from ..metrics import counterfact_metrics
from ..metrics.counterfact import PROTOCOLS as CF
from ..metrics.perplexity import PREFIXED, PROTOCOLS as PPL
from .base import Measurement
from .wild import after, before

if TYPE_CHECKING:
    from ..data.case import EditCase
    from ..editors.base import Edit, Editor
    from ..session import HarnessSession
    from ..timing import PhaseTimer


def counterfact(session: HarnessSession, case: EditCase, edit: Edit | None = None) -> dict[str, Any]:
    """CounterFact metrics of ``case`` on the model as it is now (with an in-context edit's prompt prefix)."""
    return counterfact_metrics(session.lm.model, session.lm.tokenizer, case, prefix=edit.prompt_prefix if edit else "")


def expect_ahead(session: HarnessSession, editor: Editor, case: EditCase, timer: PhaseTimer) -> None:
    """Tell an editor that optimises v* ahead (``Capabilities.values_ahead``, ``--vstar-batch K``) which single
    edits, each from the unedited model, follow this one of ``case`` in the run: the session's ``AheadPlan``."""
    session.ahead.expect(editor, case, timer.clock)


def single_edit(session: HarnessSession, editor: Editor, case: EditCase, timer: PhaseTimer) -> Measurement:
    """CounterFact scores before (``*_pre``) and after the edit, perplexity before (once per session) and after,
    their ratio; with ``--wild`` the WILD scores, with ``--fluency`` generation fluency and consistency before and
    after, and KnowEdit portability for KnowEdit cases; the model is restored after."""
    base = session.base_perplexity()
    with timer.phase("evaluate"):
        pre = counterfact(session, case)
    gen_pre = before(session, case, timer, wild=session.options.wild, fluency=session.options.fluency)
    expect_ahead(session, editor, case, timer)
    with edited(session.lm, editor, [case], timer) as edit:
        with timer.phase("evaluate"):
            post = counterfact(session, case, edit)
        extra, extra_protocols, extra_info = after(session, case, edit, gen_pre, timer)
        with timer.phase("perplexity"):
            ppl = session.perplexity(prefix=edit.prompt_prefix, edit=edit)
    metrics = {**{f"{k}_pre": v for k, v in pre.items()}, **post,
               "ppl_before": base.mean_ppl, "ppl_after": ppl.mean_ppl, "ppl_ratio": ppl.mean_ppl / base.mean_ppl,
               "ppl_token_before": base.token_ppl, "ppl_token_after": ppl.token_ppl}
    ppl_protocol = f"{PPL['ppl']} on {session.ppl_corpus_name()}"
    prefixed = f", after the edit: {PREFIXED}" if edit.prompt_prefix else ""
    protocols = {**{f"{k}_pre": v for k, v in CF.items()}, **CF,
                 "ppl_before": ppl_protocol, "ppl_after": ppl_protocol + prefixed, "ppl_ratio": ppl_protocol + prefixed,
                 "ppl_token_before": PPL["ppl_token"], "ppl_token_after": PPL["ppl_token"] + prefixed, **extra_protocols}
    return Measurement({**metrics, **extra}, protocols, {**edit.info, **extra_info})
