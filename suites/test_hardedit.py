"""HardEdit (Yang et al., 2024, "The Butterfly Effect of Model Editing"): edits that collapse a model in one
step. Their trigger is a prompt that begins with the subject, whose key at the first position is degenerate.
Each hard case is a single-edit test with the collapse threshold asserted; then one sequential run over them."""
import pytest

pytestmark = pytest.mark.suite("hardedit")


@pytest.mark.cases("hard")
def test_hard_single_edit(harness, editor, case, record):
    metrics, protocols, info = harness.single_edit(editor, case, record.timer)
    record.add(metrics, protocols)
    record.note(**info)
    problems = harness.problems(metrics)
    assert not problems, "; ".join(problems)


def test_hard_sequential(harness, editor, record):
    cases = harness.cases(harness.options.hard_dataset, limit=harness.options.seq_edits)
    result = harness.sequential(editor, cases, record.timer)
    m = result.metrics(harness.thresholds.collapse_ppl_ratio)
    record.add(m, protocol="sequential over the hard set")
    record.note(resumed_from=result.resumed_from)
    assert m["edits_to_collapse"] is None, (
        f"edits_to_collapse={m['edits_to_collapse']}: ppl_ratio reached the collapse threshold "
        f"{harness.thresholds.collapse_ppl_ratio} within {m['n_edits']} hard edits")
