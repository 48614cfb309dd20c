"""The five editing problems of Hase et al. (2023): error injection, tracing reversal, fact erasure, fact
amplification and fact forcing, each on cases whose true answer the model knows, scored by rewrite, paraphrase and
neighbourhood scores and their harmonic mean. Asserts the rewrite score reaches ``--min-rewrite-score``."""
import pytest

from harness.problems import PROBLEMS, PROTOCOL

pytestmark = pytest.mark.suite("editing_problems")


@pytest.mark.cases("known")
@pytest.mark.parametrize("problem", PROBLEMS)
def test_editing_problem(harness, editor, case, problem, record):
    metrics, info = harness.editing_problem(editor, case, problem, record.timer)
    record.add(metrics, protocol=PROTOCOL)
    record.note(**info)
    assert metrics["rewrite_score"] >= harness.thresholds.min_rewrite_score, (
        f"rewrite_score={metrics['rewrite_score']:.3f} < min_rewrite_score {harness.thresholds.min_rewrite_score} "
        f"({problem}: P(target) {metrics['p_target_pre']:.3f} -> {metrics['p_target_post']:.3f})")
