"""Downstream ability after editing (the collapse papers; AlphaEdit's "general ability"): lm-eval tasks (BoolQ,
PIQA, ARC-Challenge, ... from local files, ``--downstream-tasks``, ``--downstream-limit``) scored on the base model
once per session and after the edit(s); the accuracy drop per task must stay under ``--max-accuracy-drop``.
Then a sequential run over the hard cases: perplexity and accuracy at every state, and their Spearman and Pearson
correlation per task."""
import pytest

from harness import protocols
from harness.downstream import DownstreamUnavailable

pytestmark = pytest.mark.suite("downstream")


@pytest.fixture(scope="module", autouse=True)
def lm_eval_installed(harness):
    try:
        harness.downstream
    except DownstreamUnavailable as e:
        pytest.skip(str(e))


def test_downstream_single_edit(harness, editor, record):
    m = protocols.downstream_edit(harness, editor, harness.cases()[0], record.timer)
    record.add(m)
    assert not (bad := harness.thresholds.violations_downstream(m)), "; ".join(bad)


def test_ppl_downstream_correlation(harness, editor, record):
    cases = harness.cases(harness.options.hard_dataset, limit=harness.options.corr_edits)
    m = protocols.correlation(harness, editor, cases, record.timer)
    record.add(m)
    assert not (bad := harness.thresholds.violations_correlation(m)), "; ".join(bad)
