"""The sequential suite on a tiny model: the run JSON carries the curve, collapse count, retention and norms; a run
killed mid-way and resumed ends with the same records as an uninterrupted one."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from harness.sequential import schedule_points

from .test_plugin import SUITES, tiny_model_dir  # noqa: F401  (fixture)

pytest_plugins = ["pytester"]


def test_schedule_points():
    assert schedule_points(5) == [1, 2, 3, 4, 5]
    assert schedule_points(7, "every:3") == [3, 6, 7]
    assert schedule_points(10, "geometric") == [1, 2, 4, 8, 10]
    with pytest.raises(ValueError, match="every, every:K or geometric"):
        schedule_points(3, "sometimes")


def _args(model_dir, report_dir, *extra):
    return [str(SUITES / "test_sequential.py"), "--model", str(model_dir), "--device", "cpu",
            "--cache-dir", str(report_dir.parent / "cache"), "--report-dir", str(report_dir), "-p", "no:cacheprovider",
            "--stats-tokens", "2000", "--ppl-texts", "8", "--collapse-ratio", "1e6",
            "--hparam", "rome.layer=1", "--hparam", "memit.layers=[1,2]", "--hparam", "v_num_grad_steps=4",
            "--hparam", "context_template_length_params=[[3,2]]", *extra]


def _seq_record(report_dir: Path) -> dict:
    run = json.loads((report_dir / "latest.json").read_text())
    (rec,) = [r for r in run["records"] if r["suite"] == "sequential"]
    return rec


def test_sequential_suite_records(pytester, tiny_model_dir):  # noqa: F811
    reports = pytester.path / "reports"
    result = pytester.runpytest_subprocess(*_args(tiny_model_dir, reports, "--editor", "memit", "--seq-edits", "4",
                                                  "--batch-size", "2", "--ppl-schedule", "every"))
    result.assert_outcomes(passed=1)
    m = _seq_record(reports)["metrics"]
    assert [n for n, _ in m["ppl_curve"]] == [0, 2, 4]
    assert m["edits_to_collapse"] is None and m["n_edits"] == 4
    assert 0 <= m["efficacy_immediate"] <= 1 and 0 <= m["efficacy_final"] <= 1
    assert [n for n, _ in m["norm_l1"]] == [2, 4] and all(v > 0 for _, v in m["norm_l1"])
    assert len(m["norm_l1_by_param"]) == 2                       # MEMIT edits two layers here


def test_mirage_probe(pytester, tiny_model_dir):  # noqa: F811
    """--probe-every K: every K edits a seeded sample of past edits is scored teacher-forced and in the wild; the
    curves reach the run JSON and the HTML report, and the run key names the probe."""
    reports = pytester.path / "reports"
    result = pytester.runpytest_subprocess(*_args(tiny_model_dir, reports, "--editor", "rome", "--seq-edits", "5",
                                                  "--probe-every", "2", "--probe-size", "2"))
    result.assert_outcomes(passed=1)
    rec = _seq_record(reports)
    m = rec["metrics"]
    for name in ("probe_tf_efficacy", "probe_tf_acc", "probe_wild_efficacy", "probe_wild_em"):
        assert [n for n, _ in m[name]] == [2, 4, 5], name          # every 2 edits and the last
        assert all(0 <= v <= 1 for _, v in m[name]), name
    assert rec["info"]["probe_every"] == 2 and rec["info"]["probe_size"] == 2
    for k in ("efficacy", "paraphrase", "neighborhood"):                   # a stream's intervals: over its edits
        low, high = m["final_ci"][k]
        assert low <= m[f"{k}_final"] <= high, k
    journal = next((reports / "sequential").glob("rome-*.jsonl")).read_text().splitlines()
    probes = [json.loads(line)["probe"] for line in journal if "probe" in json.loads(line)]
    assert [len(p["case_ids"]) for p in probes] == [2, 2, 2]
    ids = [json.loads(line)["case_ids"][0] for line in journal]
    assert all(set(p["case_ids"]) <= set(ids[:n]) for p, n in zip(probes, (2, 4, 5)))   # only edits already made
    assert "teacher-forced vs in the wild" in (reports / "latest.html").read_text()
    assert rec["info"]["stream_cases"]["n"] == 5             # the stream's cases (provenance has --cases')


def test_collapse_is_reported(pytester, tiny_model_dir):  # noqa: F811
    reports = pytester.path / "reports"
    result = pytester.runpytest_subprocess(*_args(tiny_model_dir, reports, "--editor", "rome", "--seq-edits", "2",
                                                  "--collapse-ratio", "0.1"))
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*edits_to_collapse=1: ppl_ratio reached the collapse threshold 0.1*"])
    assert _seq_record(reports)["metrics"]["edits_to_collapse"] == 1


# SIGKILLs the pytest process (as an OOM killer or a preempted job does) right after the sequential run journaled and
# checkpointed its second edit: mid-way, at the same point on a fast or a loaded machine (a kill sent from outside
# when the journal shows 2 lines can arrive after the last edit when the machine is busy)
SEQ_KILLER = """
import os, signal
from harness.sequential import SequentialRun

_save = SequentialRun._save

def _save_then_die(self, lines, names):
    _save(self, lines, names)
    if len(lines) == 2:
        os.kill(os.getpid(), signal.SIGKILL)

SequentialRun._save = _save_then_die
"""


def test_killed_run_resumes_with_the_same_records(tiny_model_dir, tmp_path):  # noqa: F811
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    n = "6"
    full = tmp_path / "full"
    subprocess.run([sys.executable, "-m", "pytest", *_args(tiny_model_dir, full, "--editor", "rome",
                                                           "--seq-edits", n, "--probe-every", "3")], env=env,
                   check=True, cwd=tmp_path,
                   capture_output=True)
    part = tmp_path / "part"
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "seq_killer.py").write_text(SEQ_KILLER)
    killer_env = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path / "plugins"),
                                                                             env.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "pytest", *_args(tiny_model_dir, part, "--editor", "rome",
                                                                  "--seq-edits", n, "--probe-every", "3"),
                           "-p", "seq_killer"],
                          env=killer_env, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-3000:] + proc.stderr[-3000:]
    journals = list((part / "sequential").glob("*.jsonl"))
    lines = len(journals[0].read_text().splitlines())
    assert 2 <= lines < int(n), "the run was not interrupted mid-way"
    assert not (part / "latest.json").exists()
    subprocess.run([sys.executable, "-m", "pytest", *_args(tiny_model_dir, part, "--editor", "rome",
                                                           "--seq-edits", n, "--probe-every", "3", "--resume")],
                   env=env, check=True, cwd=tmp_path, capture_output=True)
    a, b = _seq_record(full), _seq_record(part)
    assert b["info"]["resumed_from"] >= 2 and a["info"]["resumed_from"] == 0
    flat = lambda v: [x for row in v for x in row] if isinstance(v, list) else v  # noqa: E731
    for k in ("ppl_curve", "efficacy_immediate", "efficacy_final", "norm_l1", "edits_to_collapse", "n_edits",
              "probe_tf_efficacy", "probe_wild_efficacy"):
        expected = flat(a["metrics"][k])
        assert flat(b["metrics"][k]) == (expected if expected is None else pytest.approx(expected, rel=1e-6)), k


def test_hardedit_suite_and_miner(pytester, tiny_model_dir, tmp_path):  # noqa: F811
    """The HardEdit suite runs the hard set (single edits + one sequential run); the miner writes what it finds
    in the HardEdit format, which loads back."""
    from harness.cli import main
    from harness.data import load_hardedit

    reports = pytester.path / "reports"
    args = _args(tiny_model_dir, reports, "--editor", "r_rome", "--cases", "2", "--seq-edits", "2",
                 "--hparam", "r_rome.layer=1", "--min-efficacy", "0")
    args[0] = str(SUITES / "test_hardedit.py")
    pytester.runpytest_subprocess(*args).assert_outcomes(passed=3)
    run = json.loads((reports / "latest.json").read_text())
    assert {r["suite"] for r in run["records"]} == {"hardedit"}
    assert {r["case_id"] for r in run["records"]} >= {"h01", "h02"}

    out = tmp_path / "hard.json"
    rc = main(["mine-hard", "--model", str(tiny_model_dir), "--device", "cpu", "--pool", "builtin-hard", "-n", "2",
               "--threshold", "0", "-o", str(out), "--hparam", "rome.layer=1", "--hparam", "v_num_grad_steps=3",
               "--hparam", "context_template_length_params=[[3,2]]"])
    assert rc == 0
    mined = load_hardedit(out)
    assert [c.case_id for c in mined] == ["h01", "h02"] and all(c.source == "hardedit" for c in mined)
