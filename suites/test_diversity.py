"""Target diversity and norm growth (Huang et al., 2024, the D4S paper): edit sets over the same subjects that differ
only in their targets (yes/no, A-D letters, 4 reused entities, all different; ``--diversity-sets``), each run as a
sequential stream of ``--seq-edits`` edits. Does the decline grow with the targets' diversity, and does the edited
layers' L1 norm track editing accuracy? Each stream asserts the collapse and norm-growth thresholds
(``--collapse-ratio``, ``--max-norm-growth``); per editor, the correlations across sets are recorded."""
import pytest

from harness import protocols

pytestmark = pytest.mark.suite("diversity")


@pytest.fixture(scope="module")
def streams() -> dict:
    """(editor, set) -> the stream's Measurement, for the comparison across sets of each editor."""
    return {}


def test_diversity_stream(harness, editor, diversity_set, record, streams):
    m = protocols.diversity(harness, editor, diversity_set, record.timer)
    streams[(editor.name, diversity_set.kind)] = m
    record.add(m)
    assert not (bad := harness.thresholds.violations_diversity(m)), "; ".join(bad)


def test_diversity_decline(harness, editor, record, streams):
    mine = [m for (name, _), m in streams.items() if name == editor.name]
    if len(mine) < 3:
        pytest.skip(f"{len(mine)} diversity stream(s) of {editor.name} in this process; the comparison across sets "
                    "needs 3 or more (--diversity-sets, and no -k / xdist split of this suite)")
    m = protocols.diversity_summary(mine)
    record.add(m)
    assert not (bad := harness.thresholds.violations_diversity_summary(m)), "; ".join(bad)
    assert not (bad := harness.thresholds.violations_diversity_results(m, harness.options.seq_edits)), "; ".join(bad)
