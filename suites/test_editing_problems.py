"""The five editing problems of Hase et al. (2023): error injection, tracing reversal, fact erasure, fact
amplification and fact forcing, each on cases whose true answer the model knows, scored by rewrite, paraphrase and
neighbourhood scores and their harmonic mean. Asserts the rewrite score reaches ``--min-rewrite-score``."""
import pytest

from harness import protocols
from harness.problems import PROBLEMS

pytestmark = pytest.mark.suite("editing_problems")


@pytest.mark.cases("known")
@pytest.mark.parametrize("problem", PROBLEMS)
def test_editing_problem(harness, editor, case, problem, record):
    m = protocols.editing_problem(harness, editor, case, problem, record.timer)
    record.add(m)
    assert not (bad := harness.thresholds.violations_editing_problems(m)), "; ".join(bad)
