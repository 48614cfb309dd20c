"""Evaluation in the wild (Yang et al., ACL 2025, "The Mirage of Model Editing"): each edit is scored teacher-forced
(the target's tokens fed to the model) and in the wild (the model generates its answer greedily, stopped by a stop
string, EOS or 50 tokens; exact match and containment), side by side. Cases: QAEdit with a data dir, else the run's
dataset (``--wild-dataset``)."""
import pytest

from harness import protocols

pytestmark = pytest.mark.suite("wild")


@pytest.mark.cases("wild")
def test_wild(harness, editor, case, record):
    m = protocols.wild(harness, editor, case, record.timer)
    record.add(m)
    assert not (bad := harness.thresholds.violations_wild(m)), "; ".join(bad)
