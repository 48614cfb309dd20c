"""The pytest plugin end to end on a tiny model saved to disk: the real single-edit suite runs, the run JSON holds
the promised fields, and bad options are usage errors naming the fix."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import tiny_model_dir  # noqa: F401  (tests/test_sequential.py imports the fixture from here)

pytest_plugins = ["pytester"]
SUITES = Path(__file__).resolve().parents[1] / "suites"


def _run(pytester, tiny_model_dir, *extra, in_process=False):
    """The suite in a fresh pytest process; ``in_process``: in this one (pytester's in-process run, a real pytest
    session with the plugin), for usage errors that stop it before anything loads: no 4 s torch import per case."""
    run = pytester.runpytest if in_process else pytester.runpytest_subprocess
    return run(
        str(SUITES / "test_single_edit.py"), "--model", str(tiny_model_dir), "--device", "cpu",
        "--cache-dir", str(pytester.path / "cache"), "--report-dir", str(pytester.path / "reports"),
        "--stats-tokens", "2000", "--ppl-texts", "8", "--cases", "2", "-p", "no:cacheprovider",
        "--hparam", "rome.layer=1", "--hparam", "memit.layers=[1,2]", "--hparam", "ft.layer=1",
        "--hparam", "v_num_grad_steps=4", "--hparam", "context_template_length_params=[[3,2]]", *extra)


def test_single_edit_suite_writes_run_json(pytester, tiny_model_dir):
    result = _run(pytester, tiny_model_dir, "--editor", "rome", "--editor", "ft",
                  "--min-efficacy", "0", "--collapse-ratio", "1e6")
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(["*knowledge-editing benchmark*", "single_edit *", "report: *run-*.json"])
    assert {"rome", "ft_l"} <= {line.split()[0] for line in result.stdout.lines if line.startswith(("rome ", "ft_l "))}
    run = json.loads((pytester.path / "reports" / "latest.json").read_text())
    assert run["schema_version"] == 2 and run["model"]["family"] == "llama"
    assert {"hostname", "torch", "device"} <= set(run["machine"])
    assert run["config"]["thresholds"]["collapse_ppl_ratio"] == 1e6
    assert len(run["records"]) == 4
    for r in run["records"]:
        assert r["suite"] == "single_edit" and r["editor"] in ("rome", "ft_l") and r["outcome"] == "passed"
        for k in ("efficacy_success", "paraphrase_success", "neighborhood_success", "ppl_before", "ppl_after",
                  "ppl_ratio"):
            assert isinstance(r["metrics"][k], float), k
        assert {"edit", "evaluate", "perplexity", "restore"} <= set(r["timings"])
        assert "peak_rss_mb" in r["memory"] and "efficacy_success" in r["protocols"]
    assert (pytester.path / "reports" / "latest.html").exists()


def test_threshold_failure_names_metric_value_and_threshold(pytester, tiny_model_dir):
    result = _run(pytester, tiny_model_dir, "--editor", "rome", "--collapse-ratio", "0.5", "--cases", "1")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*ppl_ratio=* >= collapse threshold 0.5*"])
    run = json.loads((pytester.path / "reports" / "latest.json").read_text())
    assert run["records"][0]["outcome"] == "failed" and "collapse threshold" in run["records"][0]["message"]


@pytest.mark.parametrize("args,message", [
    (["--editor", "nope"], "--editor nope: unknown editor; available: *"),
    (["--editor", "rome", "--hparam", "rome.lyer=3"], "*no hyper-parameter 'lyer'*"),
    (["--editor", "rome", "--hparam", "nosuchkey=3"], "*no selected editor has a hyper-parameter 'nosuchkey'*"),
])
def test_usage_errors(pytester, tiny_model_dir, args, message):
    result = _run(pytester, tiny_model_dir, *args, in_process=True)
    assert result.ret != 0
    result.stderr.fnmatch_lines([f"*{message}"])


def test_unknown_model_is_one_clear_error(pytester):
    result = pytester.runpytest(str(SUITES / "test_single_edit.py"), "--model", "/no/such/dir",     # in-process
                                "--editor", "rome", "-p", "no:cacheprovider")
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*not a model directory*"])


REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.slow
def test_rome_on_the_embedded_model(pytester):
    """The README's main job in small: ROME on two built-in cases of the embedded model edits and does not
    collapse it; with the data dir, the same suite runs on CounterFact."""
    args = [str(SUITES / "test_single_edit.py"), "--editor", "rome", "--cases", "2", "--ppl-texts", "20",
            "--report-dir", str(pytester.path / "reports"), "-p", "no:cacheprovider"]
    # the built-in passages keep CI's time bounded (the default without a data dir samples 100k tokens from the
    # model once per machine; tests/test_stats.py covers that path on a tiny model)
    result = pytester.runpytest_subprocess(*args, "--stats-corpus", "builtin", "--stats-tokens", "5000")
    result.assert_outcomes(passed=2)
    run = json.loads((pytester.path / "reports" / "latest.json").read_text())
    assert run["model"]["name"] == "smollm2-135m" and run["model"]["n_layers"] == 30
    assert all(r["metrics"]["efficacy_success"] == 1.0 for r in run["records"])
    if REAL_DATA.is_dir():
        result = pytester.runpytest_subprocess(*args[:-2], "--data-dir", str(REAL_DATA), "--cases", "1",
                                               "--stats-tokens", "20000")
        result.assert_outcomes(passed=1)
        run = json.loads((pytester.path / "reports" / "latest.json").read_text())
        assert run["records"][0]["case_id"] == "20952"      # the first record of the CounterFact sample


def test_baseline_gates_the_session(pytester, tiny_model_dir):
    """--baseline: an identical baseline passes; one the run is worse than fails the session; a bad file is a
    usage error before anything runs."""
    common = ["--editor", "rome", "--cases", "1", "--min-efficacy", "0", "--collapse-ratio", "1e6"]
    _run(pytester, tiny_model_dir, *common).assert_outcomes(passed=1)
    run = json.loads((pytester.path / "reports" / "latest.json").read_text())
    for r in run["records"]:       # the scores stay; timings are the machine's (a loaded CI runner is slower)
        r["timings"] = {k: 100 * v + 10 for k, v in r["timings"].items()}
    same = pytester.path / "same.json"
    same.write_text(json.dumps(run))
    result = _run(pytester, tiny_model_dir, *common, "--baseline", str(same))
    assert result.ret == 0
    result.stdout.fnmatch_lines(["*comparison with baseline*", "0 regression(s) against *"])
    for r in run["records"]:                       # a baseline whose perplexity ratio was far better
        r["metrics"]["ppl_ratio"] /= 3
    run["summary"] = []           # the summary is not what compare reads
    better = pytester.path / "better.json"
    better.write_text(json.dumps(run))
    result = _run(pytester, tiny_model_dir, *common, "--baseline", str(better))
    assert result.ret == 1
    result.stdout.fnmatch_lines(["*ppl_ratio*", "1 regression(s) against *"])
    result = _run(pytester, tiny_model_dir, *common, "--baseline", str(pytester.path / "missing.json"),
                  in_process=True)
    assert result.ret == 4
    result.stderr.fnmatch_lines(["*--baseline: *missing.json*"])


def test_sigterm_stops_the_session_and_keeps_the_records_made(pytester, tiny_model_dir):
    """A preempted or killed run (SIGTERM) ends as Ctrl-C does: the run JSON holds the tests already run."""
    pytester.makepyfile(term_after_first="""
        import os, signal
        def pytest_runtest_logfinish(nodeid, location):
            os.kill(os.getpid(), signal.SIGTERM)
    """)
    result = _run(pytester, tiny_model_dir, "--editor", "rome", "--editor", "ft", "--min-efficacy", "0",
                  "--collapse-ratio", "1e6", "-p", "term_after_first")
    assert result.ret == pytest.ExitCode.INTERRUPTED, result.stdout.str()
    run = json.loads((pytester.path / "reports" / "latest.json").read_text())
    assert len(run["records"]) == 1 and run["records"][0]["outcome"] == "passed"
