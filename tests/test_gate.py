"""The gate bites: the committed CPU baseline (baselines/cpu-gate.json, made by `tox -e baselines`) is rerun for one
editor on the embedded model with the gate set's settings; the identical rerun passes `harness compare` with every
score equal, and a deliberately weakened editor (ROME with 2 v* steps instead of 20) fails it, naming the editor
and the metric. Slow (about 4 minutes on one core): the embedded model, the data dir, 20 ROME edits."""
from __future__ import annotations

import configparser
import copy
import json
import shlex
from pathlib import Path

import pytest

from harness.cli import main as harness_main

pytest_plugins = ["pytester"]

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
BASELINE = REPO / "baselines" / "cpu-gate.json"
# the gate set's settings, as tox.ini's [gate] section gives them (checked below, so the two cannot drift apart)
GATE = ["--dataset", "counterfact", "--cases", "10", "--seq-edits", "5", "--ppl-texts", "10"]

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (DATA / "counterfact").is_dir(), reason="needs the data dir ../shared/data"),
              pytest.mark.skipif(not BASELINE.is_file(), reason="no baselines/cpu-gate.json (tox -e baselines)")]


def test_the_gate_settings_are_toxs():
    ini = configparser.ConfigParser(interpolation=None)
    ini.read(REPO / "tox.ini")
    args = shlex.split(ini["gate"]["args"])
    for flag, value in zip(GATE[::2], GATE[1::2]):
        assert args[args.index(flag) + 1] == value, flag


def _baseline_of(editor: str, suite: str, out: Path) -> Path:
    """The committed baseline restricted to one editor's records of one suite (compare flags absent editors)."""
    run = json.loads(BASELINE.read_text())
    sub = copy.deepcopy(run)
    sub["records"] = [r for r in run["records"] if r["editor"] == editor and r["suite"] == suite]
    assert len(sub["records"]) == 10
    out.write_text(json.dumps(sub))
    return out


def _run(pytester, reports: Path, *extra: str) -> Path:
    pytester.runpytest_subprocess(
        str(REPO / "suites" / "test_single_edit.py"), "--editor", "rome", "--data-dir", str(DATA), *GATE,
        "--report-dir", str(reports), "-p", "no:cacheprovider", *extra)
    return reports / "latest.json"


def test_an_identical_rerun_passes_and_a_weakened_editor_fails(pytester, tmp_path, capsys):
    baseline = _baseline_of("rome", "single_edit", tmp_path / "rome-baseline.json")

    same = _run(pytester, tmp_path / "same")
    assert harness_main(["compare", str(baseline), str(same), "--tol-time", "none"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("OK: 0 regression(s), 0 improvement(s)")
    base, rerun = (json.loads(p.read_text())["records"] for p in (baseline, same))
    scores = ("efficacy_success", "paraphrase_success", "neighborhood_success", "ppl_ratio")
    assert {r["case_id"]: [r["metrics"][k] for k in scores] for r in base} == \
        {r["case_id"]: [r["metrics"][k] for k in scores] for r in rerun}          # the spread on this machine: 0

    weak = _run(pytester, tmp_path / "weak", "--hparam", "rome.v_num_grad_steps=2")
    assert harness_main(["compare", str(baseline), str(weak), "--tol-time", "none"]) == 1
    out = capsys.readouterr().out
    assert out.splitlines()[-1].startswith("REGRESSION")
    regressed = [line for line in out.splitlines() if "**REGRESSED**" in line]
    assert any(f"| single_edit | rome | {metric} |" in line for line in regressed
               for metric in ("efficacy_success", "efficacy_magnitude")), out
    assert "editor code or settings differ (rome: settings v_num_grad_steps 20 vs 2)" in out
