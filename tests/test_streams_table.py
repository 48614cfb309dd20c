"""The 1,000-edit streams' tables in docs/results.md and the README are what benchmarks/streams.py makes of the
committed run JSONs (benchmarks/results/streams/), and the per-edit cost of a resumed stream counts only the edits
that process made."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNS = sorted((ROOT / "benchmarks" / "results" / "streams").glob("*-1000.json"))


@pytest.fixture(scope="module")
def streams():
    spec = importlib.util.spec_from_file_location("streams", ROOT / "benchmarks" / "streams.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def rows(streams):
    assert RUNS, "no committed 1,000-edit run JSONs in benchmarks/results/streams/"
    return [streams.row(run, rec) for run, rec in streams.stream_records([str(p) for p in RUNS])]


def test_every_committed_stream_is_a_full_thousand_edits(rows):
    assert len(rows) == len(RUNS)
    assert all(r["n_edits"] == 1000 for r in rows)
    assert len({r["editor"] for r in rows}) == len(rows)


def test_the_results_table_is_the_run_jsons(streams, rows):
    doc = (ROOT / "docs" / "results.md").read_text()
    for line in streams.markdown(rows).splitlines():
        assert line in doc, f"docs/results.md lacks this line of `benchmarks/streams.py`'s table:\n{line}"


def test_the_readme_has_one_line_per_editor_from_them(streams, rows):
    readme = (ROOT / "README.md").read_text()
    for line in streams.readme(rows).splitlines():
        assert line in readme, f"README.md lacks this line of `benchmarks/streams.py --readme`:\n{line}"


def test_a_resumed_stream_is_costed_over_the_edits_it_made(streams):
    timings = {"edit": 900.0, "evaluate": 90.0, "evaluate_final": 100.0, "restore": 0.0}
    fresh = streams._per_edit(timings, 1000, 0)
    resumed = streams._per_edit(timings, 1000, 100)
    assert fresh["edit"] == pytest.approx(0.9) and resumed["edit"] == pytest.approx(1.0)
    assert resumed["evaluate"] == pytest.approx(0.1)
    assert resumed["evaluate_final"] == fresh["evaluate_final"] == pytest.approx(0.1)   # re-scored all 1,000


def test_resumed_edits_are_journal_steps_times_the_batch_in_older_records(streams):
    assert streams._resumed_edits({"resumed_from": 1, "batch_size": 100}, 1000) == 100
    assert streams._resumed_edits({"resumed_from": 1, "resumed_edits": 100, "batch_size": 100}, 1000) == 100
    assert streams._resumed_edits({"resumed_from": 0, "batch_size": 1}, 1000) == 0
