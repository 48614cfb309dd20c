"""Single edits (ROME paper, CounterFact): does the edit take, generalise and stay local, and does the model
stay intact? One test per (editor, case): edit, score, perplexity before/after, restore."""
import pytest

pytestmark = pytest.mark.suite("single_edit")


def test_single_edit(harness, editor, case, record):
    metrics, protocols, info = harness.single_edit(editor, case, record.timer)
    record.add(metrics, protocols)
    record.note(**info)
    problems = harness.problems(metrics)
    assert not problems, "; ".join(problems)
