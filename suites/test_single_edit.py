"""Single edits (ROME paper, CounterFact): does the edit take, generalise and stay local, and does the model
stay intact? One test per (editor, case): edit, score, perplexity before/after, restore."""
import pytest

from harness import protocols

pytestmark = pytest.mark.suite("single_edit")


def test_single_edit(harness, editor, case, record):
    m = protocols.single_edit(harness, editor, case, record.timer)
    record.add(m)
    assert not (bad := harness.thresholds.violations_single_edit(m)), "; ".join(bad)
