"""Single edits (ROME paper, CounterFact): does the edit take, generalise and stay local, and does the model
stay intact? One test per (editor, case): edit, score, perplexity before/after, restore."""
import pytest

from harness.metrics.counterfact import PROTOCOLS as CF
from harness.metrics.perplexity import PROTOCOLS as PPL

pytestmark = pytest.mark.suite("single_edit")


def test_single_edit(harness, editor, case, record):
    base = harness.base_perplexity()
    with record.phase("evaluate"):
        pre = harness.counterfact(case)
    with harness.edited(editor, [case], record.timer) as edit:
        with record.phase("evaluate"):
            post = harness.counterfact(case, edit)
        with record.phase("perplexity"):
            ppl = harness.perplexity()
    ratio = ppl.mean_ppl / base.mean_ppl
    record.add({f"{k}_pre": v for k, v in pre.items()}, CF)
    record.add(post, CF)
    record.add({"ppl_before": base.mean_ppl, "ppl_after": ppl.mean_ppl, "ppl_ratio": ratio,
                "ppl_token_before": base.token_ppl, "ppl_token_after": ppl.token_ppl},
               protocol=PPL["ppl"] + f" on {harness.ppl_corpus_name()}")
    record.note(**edit.info)

    problems = [p for p in (harness.thresholds.check_collapse(ratio),
                            harness.thresholds.check_efficacy(post["efficacy_success"])) if p]
    assert not problems, "; ".join(problems)
