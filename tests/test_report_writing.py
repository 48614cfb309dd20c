"""Writing a run: ids that cannot collide, atomic files that concurrent writers leave valid, a fallback folder
when the report dir cannot be written at the end, and the plugin's run JSON end to end on a tiny model
(provenance, schema, the terminal table with intervals, a refused baseline)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from harness.report import load_run
from harness.run import BenchmarkRun, atomic_write_text, new_run_id
from harness.schema import schema_errors

pytest_plugins = ["pytester"]
SUITES = Path(__file__).resolve().parents[1] / "suites"
ROOT = Path(__file__).resolve().parents[1]


def _record(i: int, editor: str = "rome") -> dict:
    return {"nodeid": f"suites/test_single_edit.py::test_single_edit[{editor}-c{i}]", "suite": "single_edit",
            "editor": editor, "case_id": f"c{i}", "outcome": "passed", "message": None,
            "metrics": {"efficacy_success": 1.0, "ppl_ratio": 1.0 + i / 1000}, "timings": {"edit": 1.0 + i},
            "protocols": {}, "info": {}, "memory": {}}


def test_run_ids_are_unique_and_carry_the_pid():
    ids = {new_run_id() for _ in range(2000)}
    assert len(ids) == 2000
    assert all(f"-{os.getpid()}-" in i for i in ids)


def test_atomic_write_leaves_no_temporary_file(tmp_path):
    atomic_write_text(tmp_path / "a.json", "1")
    atomic_write_text(tmp_path / "a.json", "2")
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"] and (tmp_path / "a.json").read_text() == "2"
    with pytest.raises(OSError):
        atomic_write_text(tmp_path / "no-such-dir" / "b.json", "x")
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


WRITER = textwrap.dedent("""
    import sys
    from harness.run import BenchmarkRun
    out, tag = sys.argv[1], sys.argv[2]
    for k in range(25):
        run = BenchmarkRun(config={"writer": tag})
        for i in range(300):
            run.add({"nodeid": f"t::x[{tag}-{i}]", "suite": "s", "editor": tag, "case_id": str(i),
                     "outcome": "passed", "metrics": {"efficacy_success": 1.0, "pad": "x" * 200}})
        run.write(out)
""")


def test_two_concurrent_writers_leave_valid_files(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), tag], env=env,
                              stderr=subprocess.PIPE, text=True) for tag in ("a", "b")]
    reads = 0
    while any(p.poll() is None for p in procs):
        latest = tmp_path / "latest.json"
        if latest.exists():
            json.loads(latest.read_text())          # never half-written, never missing once there
            reads += 1
    assert [p.wait() for p in procs] == [0, 0], [p.stderr.read() for p in procs]
    runs = sorted(tmp_path.glob("run-*.json"))
    assert len(runs) == 50 and reads > 0
    assert {json.loads(p.read_text())["run_id"] for p in runs} == {p.stem[4:] for p in runs}
    assert not list(tmp_path.glob(".*.tmp"))


def test_unwritable_report_dir_at_the_end_falls_back_and_says_where(tmp_path, monkeypatch):
    from harness import plugin

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    options = {"report_dir": str(blocker / "reports"), "no_report": False, "baseline": None}
    config = SimpleNamespace(getoption=options.get, rootpath=tmp_path, stash={},
                             hook=SimpleNamespace(pytest_harness_update_run_json=lambda **kw: None))
    monkeypatch.setattr(plugin, "_SESSION", "session")
    # a session holding only its options: provenance then records an error instead of failing
    config.stash["session"] = SimpleNamespace(options=SimpleNamespace(report_dir=options["report_dir"]))
    run = BenchmarkRun()
    for i in range(3):
        run.add(_record(i))
    collector = plugin.RunCollector(config, run)
    collector.pytest_sessionfinish(SimpleNamespace(exitstatus=0))
    lines = [str(p) for p in collector.paths]
    assert lines[0].startswith(f"(report dir {blocker / 'reports'} cannot be written") and "instead)" in lines[0]
    written = Path(lines[1])
    assert written.is_file() and written.parent != blocker.parent and load_run(written)["records"]
    assert (written.parent / "latest.json").is_file() and (written.parent / "latest.html").is_file()
    assert Path(lines[2]).suffix == ".html"

    class Terminal:
        lines: list[str] = []

        def section(self, title):
            self.lines.append(f"== {title}")

        def write_line(self, line):
            self.lines.append(line)

    term = Terminal()
    collector.pytest_terminal_summary(term)
    assert any(line.startswith("rome ") and "[" in line for line in term.lines)   # the results stay visible
    assert any("cannot be written" in line and str(written.parent) in line for line in term.lines)


@pytest.fixture(scope="module")
def tiny_model_path(tiny_llama, tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama-report")
    tiny_llama.model.save_pretrained(d)
    tiny_llama.tokenizer.save_pretrained(d)
    return d


def _suite(pytester, model_dir, *extra):
    return pytester.runpytest_subprocess(
        str(SUITES / "test_single_edit.py"), "--model", str(model_dir), "--device", "cpu", "--editor", "rome",
        "--cache-dir", str(pytester.path / "cache"), "--report-dir", str(pytester.path / "reports"),
        "--stats-tokens", "2000", "--ppl-texts", "8", "-p", "no:cacheprovider", "--hparam", "rome.layer=1",
        "--hparam", "v_num_grad_steps=4", "--hparam", "context_template_length_params=[[3,2]]",
        "--min-efficacy", "0", "--collapse-ratio", "1e6", *extra)


def test_plugin_writes_provenance_and_prints_intervals(pytester, tiny_model_path):
    result = _suite(pytester, tiny_model_path, "--cases", "3")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(["mean ?95% bootstrap CI over cases?*", "single_edit *n*passed*ES*",
                                 "rome *3*3/3*?*, *?*", "report: *run-*-*-*.json"])
    path = pytester.path / "reports" / "latest.json"
    run = load_run(path)                            # validated against harness/schema/run.schema.json
    assert run["schema_version"] == 2 and schema_errors(run) == []
    prov = run["provenance"]
    assert prov["editors"]["rome"]["hparams"]["layer"] == 1
    assert prov["editors"]["rome"]["overrides"]["v_num_grad_steps"] == "4"
    assert [f["path"] for f in prov["editors"]["rome"]["files"]][0] == "hparams/rome/llama.yaml"
    assert prov["dataset"]["kind"] == "builtin" and prov["dataset"]["case_ids"] == ["b01", "b02", "b03"]
    assert len(prov["dataset"]["sha256"]) == 64
    assert prov["corpora"]["perplexity"]["texts"] == 8 and prov["corpora"]["perplexity"]["tokens"] > 0
    assert prov["corpora"]["statistics"]["tokens_requested"] == 2000
    assert prov["harness"]["git_commit"] and isinstance(prov["harness"]["git_dirty"], bool)
    group = run["summary"][0]
    assert (group["suite"], group["editor"], group["n"]) == ("single_edit", "rome", 3)
    es = group["metrics"]["efficacy_success"]
    assert es["n"] == 3 and es["ci_low"] <= es["value"] <= es["ci_high"]
    assert not list((pytester.path / "reports").glob(".*.tmp"))

    # the same run's JSON as a baseline for a run on another dataset: refused, a usage error (exit 4)
    result = _suite(pytester, tiny_model_path, "--cases", "1", "--dataset", "builtin-hard", "--baseline", str(path))
    assert result.ret == 4
    result.stdout.fnmatch_lines(["*comparison with * refused: dataset differs ('builtin' vs 'builtin-hard')*"])
