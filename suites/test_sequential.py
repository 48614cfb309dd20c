"""Sequential editing (collapse papers; D4S): N edits one after another without restore. How many edits does a
method survive before perplexity crosses the collapse threshold, do early edits survive the later ones, and how
fast does the edited layer's norm grow?"""
import pytest

from harness.metrics.perplexity import PROTOCOLS as PPL

pytestmark = pytest.mark.suite("sequential")


def test_sequential(harness, editor, record):
    cases = harness.cases(limit=harness.options.seq_edits)
    result = harness.sequential(editor, cases, record.timer)
    m = result.metrics(harness.thresholds.collapse_ppl_ratio)
    record.add(m, {"ppl_curve": PPL["ppl"], "efficacy_immediate": "rome-counterfact, right after each edit",
                   "efficacy_final": "rome-counterfact, every edit re-scored after the last one",
                   "norm_l1": "mean |W| of the edited weight after each edit (D4S)"})
    record.note(resumed_from=result.resumed_from, batch_size=harness.options.batch_size,
                ppl_schedule=harness.options.ppl_schedule)
    assert m["edits_to_collapse"] is None, (
        f"edits_to_collapse={m['edits_to_collapse']}: ppl_ratio reached the collapse threshold "
        f"{harness.thresholds.collapse_ppl_ratio} within {m['n_edits']} edits")
