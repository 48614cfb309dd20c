"""Issue 28, "every claim holds": `harness merge` took a record of a test no shard selected and a shard whose metric
was edited after the run, and wrote its output through a fixed temporary name without fsync. Each test reproduces
the probe and asserts a one-line refusal or the right file."""
from __future__ import annotations

import copy
import json
import os

import pytest

from harness.cli import main as cli
from harness.merge import MergeError, merge_runs, write_merged
from harness.report import load_run
from harness.run import BenchmarkRun

from .test_merge import _named, _record, _shards, _unsharded, _write


def _one_line_refusal(capsys, paths: list[str], tmp_path, *needles: str) -> None:
    out = tmp_path / "merged.json"
    assert cli(["merge", *paths, "-o", str(out)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "\n" not in err and all(n in err for n in needles), err
    assert not out.exists() and "Traceback" not in captured.err


def test_merge_refuses_a_record_of_a_test_no_shard_selected(tmp_path, capsys):
    shards = _shards(_unsharded())
    stray = _record("rome", 99)                               # not collected, not selected by any shard
    shards[1]["records"].append(stray)
    shards[1]["summary"] = BenchmarkRun(records=shards[1]["records"]).summary()   # consistent: only the record is odd
    with pytest.raises(MergeError, match=r"shard-2\.json: a record of test .*\[rome-c99\], which shard 2 did not "
                                         r"select \(shard\.selected\)"):
        merge_runs(_named(shards))
    _one_line_refusal(capsys, _write(tmp_path, shards), tmp_path, "run-1.json", "[rome-c99]", "did not select")


def test_merge_refuses_a_shard_whose_metric_was_edited(tmp_path, capsys):
    shards = _shards(_unsharded())
    rec = next(r for r in shards[0]["records"] if r["metrics"]["efficacy_success"] == 0.5)
    rec["metrics"]["efficacy_success"] = 1.0                  # edited after the run; the summary says otherwise
    with pytest.raises(MergeError, match=r"shard-1\.json: its summary does not match its records \(summary\[single_"
                                         r"edit/\w+\]\.metrics\.efficacy_success\.value .* recomputed\)"):
        merge_runs(_named(shards))
    _one_line_refusal(capsys, _write(tmp_path, shards), tmp_path, "run-0.json", "summary does not match its records")


def test_merge_refuses_a_shard_whose_summary_was_edited():
    shards = _shards(_unsharded())
    shards[2]["summary"][0]["passed"] += 1
    with pytest.raises(MergeError, match=r"shard-3\.json: its summary does not match its records \(summary\[.*\]\."
                                         r"passed"):
        merge_runs(_named(shards))
    outcome = _shards(_unsharded())
    outcome[2]["records"][0]["outcome"] = "failed"            # a test's outcome rewritten
    with pytest.raises(MergeError, match=r"shard-3\.json: its summary does not match"):
        merge_runs(_named(outcome))


def test_an_untouched_sweep_still_merges():
    merged, _ = merge_runs(_named(_shards(_unsharded())))
    assert len(merged["records"]) == 12


def test_merged_file_is_written_under_a_unique_name_fsynced_and_renamed(tmp_path, monkeypatch):
    merged, _ = merge_runs(_named(_shards(_unsharded())))
    out = tmp_path / "merged.json"
    (tmp_path / "merged.json.tmp").mkdir()                    # the old fixed temporary name is taken
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    written = write_merged(copy.deepcopy(merged), out, html=False)
    assert written == [out] and synced                         # the bytes reached the disk before the rename
    assert load_run(out)["run_id"] == "sw-merged" and json.loads(out.read_text()) == merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged.json", "merged.json.tmp"]   # nothing left behind
