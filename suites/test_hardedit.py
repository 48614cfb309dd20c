"""HardEdit (Yang et al., 2024, "The Butterfly Effect of Model Editing"): edits that collapse a model in one
step. Their trigger is a prompt that begins with the subject, whose key at the first position is degenerate.
Each hard case is a single-edit test with the collapse threshold asserted; then one sequential run over them."""
import pytest

from harness import protocols

pytestmark = pytest.mark.suite("hardedit")


@pytest.mark.cases("hard")
def test_hard_single_edit(harness, editor, case, record):
    m = protocols.single_edit(harness, editor, case, record.timer)
    record.add(m)
    assert not (bad := harness.thresholds.violations_hardedit(m)), "; ".join(bad)


def test_hard_sequential(harness, editor, record):
    cases = harness.stream_cases(harness.options.hard_dataset)
    m = protocols.sequential(harness, editor, cases, record.timer)
    record.add(m)
    assert not (bad := harness.thresholds.violations_sequential(m)), "; ".join(bad)
