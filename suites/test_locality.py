"""Locality (ROME paper, CounterFact; MEND/EasyEdit, zsRE): what an edit must leave alone. One test per
(editor, case): edit, then against the unedited model measure neighbourhood success (the true fact still wins on
prompts about other subjects), the drift of next-token distributions on unrelated general text (mean KL and the
fraction of changed top-1 tokens) and, for zsRE / KnowEdit data, QA locality on the NQ questions; restore."""
import pytest

from harness import protocols

pytestmark = pytest.mark.suite("locality")


def test_locality(harness, editor, case, record):
    m = protocols.locality(harness, editor, case, record.timer)
    record.add(m)
    assert not (bad := harness.thresholds.violations_locality(m)), "; ".join(bad)
