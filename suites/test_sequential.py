"""Sequential editing (collapse papers; D4S): N edits one after another without restore. How many edits does a
method survive before perplexity crosses the collapse threshold, do early edits survive the later ones, and how
fast does the edited layer's norm grow?"""
import pytest

from harness import protocols

pytestmark = pytest.mark.suite("sequential")


def test_sequential(harness, editor, record):
    m = protocols.sequential(harness, editor, harness.stream_cases(), record.timer)
    record.add(m)
    assert not (bad := harness.thresholds.violations_sequential(m)), "; ".join(bad)
