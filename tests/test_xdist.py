"""The real single-edit suite on a tiny model saved to disk, run serially and with ``-n 2`` (pytest-xdist): each
run writes ONE run JSON (the controller's, not one per worker), and the records agree once timing, memory and
node-id order are dropped: same (suite, editor, case_id, outcome) set and the same metric values.

The tiny model is deterministic on CPU, and so is everything that samples (ROME's context templates are drawn
under a fixed seed in a forked RNG), so the only allowed difference is floating-point noise from a different
thread count: the plugin gives each xdist worker ``cpu_count // n_workers`` torch threads, and a serial run uses
torch's default (``OMP_NUM_THREADS`` when set). The serial run here gets ``OMP_NUM_THREADS`` equal to what a worker of
``-n 2`` sets itself, so both runs compute with the same thread count and any difference is xdist's doing (on the
project's 2-core machines that is 1 thread, as the project runs its tests anyway).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]
SUITES = Path(__file__).resolve().parents[1] / "suites"
REL = 1e-5          # relative tolerance on metric values
ABS = 1e-7          # absolute floor, for values at or near 0
NOISE = ("nodeid", "timings", "memory", "message")


def _run(pytester, tiny_model_dir, name: str, *extra):
    """As tests/test_plugin.py's ``_run``, with a cache and report folder of its own per run (so neither run
    reads statistics the other computed, and each run's JSON files can be counted)."""
    return pytester.runpytest_subprocess(
        str(SUITES / "test_single_edit.py"), "--model", str(tiny_model_dir), "--device", "cpu",
        "--cache-dir", str(pytester.path / name / "cache"), "--report-dir", str(pytester.path / name / "reports"),
        "--stats-tokens", "2000", "--ppl-texts", "8", "--cases", "2", "-p", "no:cacheprovider",
        "--hparam", "rome.layer=1", "--hparam", "memit.layers=[1,2]", "--hparam", "ft.layer=1",
        "--hparam", "v_num_grad_steps=4", "--hparam", "context_template_length_params=[[3,2]]",
        "--editor", "rome", "--editor", "ft", "--min-efficacy", "0", "--collapse-ratio", "1e6", *extra)


def _the_run_json(report_dir: Path) -> dict:
    runs = sorted(report_dir.glob("run-*.json"))
    assert len(runs) == 1, f"expected one run JSON in {report_dir}, found {[p.name for p in runs]}"
    run = json.loads(runs[0].read_text())
    assert json.loads((report_dir / "latest.json").read_text())["run_id"] == run["run_id"]
    return run


def _key(rec: dict) -> tuple:
    return rec["suite"], rec["editor"], rec["case_id"], rec["outcome"]


def _by_key(run: dict) -> dict[tuple, dict]:
    out: dict[tuple, dict] = {}
    for rec in run["records"]:
        assert _key(rec) not in out, f"duplicate record {_key(rec)}"
        out[_key(rec)] = {k: v for k, v in rec.items() if k not in NOISE}
    return out


def _diffs(a, b, path: str = "") -> list[str]:
    """Where two JSON values differ; floats within REL/ABS of each other are equal."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{path}.{k}: only in {'serial' if k in a else 'xdist'}" for k in sorted(set(a) ^ set(b))]
        for k in sorted(set(a) & set(b)):
            out += _diffs(a[k], b[k], f"{path}.{k}")
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: length {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _diffs(x, y, f"{path}[{i}]")]
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool) and not isinstance(b, bool):
        if math.isclose(a, b, rel_tol=REL, abs_tol=ABS):
            return []
        rel = abs(a - b) / max(abs(a), abs(b))
        return [f"{path}: serial {a!r} != xdist {b!r} (rel diff {rel:.2e})"]
    return [] if a == b else [f"{path}: serial {a!r} != xdist {b!r}"]


def test_xdist_run_matches_serial_run(pytester, tiny_model_dir, monkeypatch):
    # the thread count an xdist worker of -n 2 gives itself (harness.plugin._pin_worker_device)
    monkeypatch.setenv("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // 2)))
    serial = _run(pytester, tiny_model_dir, "serial")
    serial.assert_outcomes(passed=4)
    parallel = _run(pytester, tiny_model_dir, "xdist", "-n", "2")
    dump_errors = [line for line in parallel.outlines + parallel.errlines if "DumpError: can't serialize" in line]
    if dump_errors:     # e.g. torch.__version__ (a TorchVersion, not a str) in the record's machine info
        pytest.fail("a record holds a value execnet cannot send from an xdist worker to the controller: "
                    + dump_errors[-1].split("DumpError:")[-1].strip(), pytrace=False)
    parallel.assert_outcomes(passed=4)
    parallel.stdout.fnmatch_lines(["*2 workers*"])      # it really ran on two workers

    run_s = _the_run_json(pytester.path / "serial" / "reports")
    run_x = _the_run_json(pytester.path / "xdist" / "reports")
    for run in (run_s, run_x):
        assert {"hostname", "torch", "device", "torch_threads"} <= set(run["machine"])
        assert len(run["records"]) == 4
        assert all(r["timings"] and "peak_rss_mb" in r["memory"] for r in run["records"])
    # records are sorted by node id in both, whatever order the workers finished in
    assert [r["nodeid"] for r in run_x["records"]] == sorted(r["nodeid"] for r in run_x["records"])
    assert {r["nodeid"] for r in run_s["records"]} == {r["nodeid"] for r in run_x["records"]}

    assert run_s["machine"]["torch_threads"] == run_x["machine"]["torch_threads"]
    s, x = _by_key(run_s), _by_key(run_x)
    assert set(s) == set(x)
    assert {k[1] for k in s} == {"rome", "ft_l"} and {k[3] for k in s} == {"passed"}
    threads = f"serial torch_threads={run_s['machine'].get('torch_threads')}, " \
              f"xdist worker torch_threads={run_x['machine'].get('torch_threads')}"
    problems = [f"{k}{d}" for k in sorted(s) for d in _diffs(s[k], x[k])]
    assert not problems, f"serial and xdist runs differ ({threads}):\n" + "\n".join(problems)
    for rec in s.values():
        assert isinstance(rec["metrics"]["efficacy_success"], float)
        assert isinstance(rec["metrics"]["ppl_ratio"], float)
