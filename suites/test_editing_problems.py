"""The five editing problems of Hase et al. (2023): error injection, tracing reversal, fact erasure, fact
amplification and fact forcing, each on cases whose true answer the model knows, scored by rewrite, paraphrase and
neighbourhood scores and their harmonic mean. Asserts the rewrite score reaches ``--min-rewrite-score``. A model
that knows none of the dataset's facts (a tiny or random one) has no case to edit: the suite is skipped saying so."""
import pytest

from harness import protocols
from harness.problems import PROBLEMS, why_no_known_cases

pytestmark = pytest.mark.suite("editing_problems")


def pytest_generate_tests(metafunc):
    """The problems (the plugin parametrizes the known cases). When the model knows none of the dataset's facts,
    each problem is skipped with one line saying why and what to pass: its skip mark comes before the bare "got
    empty parameter set" one pytest adds for the empty case list."""
    from harness.plugin import _SESSION
    from harness.session import ModelUnavailable
    session = metafunc.config.stash.get(_SESSION, None)
    why = None
    if session is not None and "case" in metafunc.fixturenames:
        try:
            if not session.known_cases(session.options.known_cases):
                why = why_no_known_cases(session.cases(limit=None), session.dataset_name())
        except ModelUnavailable:          # reported once, in one line, by the plugin
            pass
    metafunc.parametrize("problem", [p if why is None else pytest.param(p, marks=pytest.mark.skip(reason=why))
                                     for p in PROBLEMS])


@pytest.mark.cases("known")
def test_editing_problem(harness, editor, case, problem, record):
    if reason := protocols.problem_unsupported(editor, problem):      # e.g. IKE cannot erase a fact
        pytest.skip(reason)
    m = protocols.editing_problem(harness, editor, case, problem, record.timer)
    record.add(m)
    assert not (bad := harness.thresholds.violations_editing_problems(m)), "; ".join(bad)
