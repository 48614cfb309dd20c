"""Fast tests for harness.report (HTML, leaderboard, compare) and the harness CLI, on synthetic runs."""

from __future__ import annotations

import copy
import json
import re

import pandas as pd
import pytest

from harness.cli import main
from harness.report import RunFileError
from harness.report.compare import compare
from harness.report.html import render_html, write_html
from harness.report.leaderboard import leaderboard, load_runs, write_leaderboard

XSS = "<script>alert(1)</script>"
XSS_ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"


def _single(editor: str, case_id: str, subject: str, efficacy: float = 1.0, outcome: str = "passed",
            message: str | None = None, ppl_ratio: float = 1.02) -> dict:
    return {
        "nodeid": f"tests/test_single.py::test_single_edit[{editor}-{case_id}]",
        "suite": "single_edit", "editor": editor, "case_id": case_id, "subject": subject,
        "outcome": outcome, "message": message,
        "metrics": {
            "efficacy_success": efficacy, "paraphrase_success": 0.8, "neighborhood_success": 0.9,
            "efficacy_magnitude": 0.4, "ppl_before": 20.0, "ppl_after": 20.0 * ppl_ratio,
            "ppl_ratio": ppl_ratio, "downstream_piqa_before": 0.70, "downstream_piqa_after": 0.68,
        },
        "timings": {"edit": 1.5, "evaluate": 0.4, "perplexity": 0.8, "restore": 0.01},
        "memory": {"peak_rss_mb": 2048.0},
        "protocols": {"efficacy_success": "rome-counterfact (probability comparison)"},
    }


def _sequential(editor: str, collapse_at: int | None, growth: float) -> dict:
    ppl = [[n, 20.0 * (1 + growth * n / 10) ** 2] for n in range(0, 50, 10)]
    return {
        "nodeid": f"tests/test_sequential.py::test_sequential[{editor}]",
        "suite": "sequential", "editor": editor, "case_id": "seq-50", "subject": None,
        "outcome": "passed" if collapse_at is None else "failed",
        "message": None if collapse_at is None else f"collapsed after {collapse_at} edits",
        "metrics": {
            "edits_to_collapse": collapse_at, "ppl_curve": ppl, "ppl_before": 20.0,
            "ppl_after": ppl[-1][1], "ppl_ratio": ppl[-1][1] / 20.0,
            "efficacy_immediate": 0.97, "efficacy_final": 0.9,
            "norm_l1": [[n, 100.0 + growth * n] for n in range(0, 50, 10)],
        },
        "timings": {"edit": 30.0, "evaluate": 5.0, "perplexity": 4.0},
        "memory": {"peak_rss_mb": 2300.0},
    }


def make_run(model: str = "smollm2-135m", run_id: str = "20261121-063012-ab12") -> dict:
    records = [
        _single("rome", "b01", "Paris"),
        _single("rome", "b02", XSS, efficacy=0.0, outcome="failed",
                message=f"efficacy 0.0 < 1.0 for {XSS}\nsecond line"),
        _single("rome", "b03", "Danielle Darrieux", outcome="skipped"),
        _single("memit", "b01", "Paris"),
        _single("memit", "b02", XSS),
        _sequential("rome", collapse_at=30, growth=0.8),
        _sequential("memit", collapse_at=None, growth=0.1),
    ]
    records[2]["metrics"] = {}
    return {
        "schema_version": 1, "run_id": run_id,
        "started": "2026-11-21T06:30:12+00:00", "finished": "2026-11-21T06:35:12+00:00", "duration_s": 300.0,
        "model": {"name": model, "family": "llama", "model_type": "llama", "fingerprint": "abc123",
                  "dtype": "float32", "n_params": 134_515_008, "n_layers": 30, "source": "embedded"},
        "machine": {"hostname": "ci", "platform": "Linux", "python": "3.11.7", "torch": "2.5.0",
                    "transformers": "4.46.0", "cpu_count": 16, "device": "cpu",
                    "gpu_name": None, "cuda": None, "driver": None},
        "config": {"editors": ["rome", "memit"], "dataset": "builtin",
                   "thresholds": {"collapse_ppl_ratio": 2.0, "min_efficacy": 1.0},
                   "hparams": {"rome": {"layers": [5], "note": XSS}}, "argv": ["pytest", "-k", XSS]},
        "records": records,
        "summary": {"rome": {"n": 4, "passed": 1}, "memit": {"n": 3, "passed": 3}},
    }


def _write(tmp_path, name: str, run) -> str:
    path = tmp_path / name
    path.write_text(json.dumps(run), encoding="utf-8")
    return str(path)


def _degrade(run: dict, editor: str, **changes) -> dict:
    """A copy of run where metric values of editor's single_edit records are transformed."""
    out = copy.deepcopy(run)
    for rec in out["records"]:
        if rec["editor"] == editor and rec["suite"] == "single_edit" and rec["metrics"]:
            for name, change in changes.items():
                rec["metrics"][name] = change(rec["metrics"][name])
    return out


# --------------------------------------------------------------------------- HTML


@pytest.fixture(scope="module")
def html() -> str:
    """The report of make_run(), rendered once for the tests that only read it."""
    return render_html(make_run())


def test_html_escapes_dataset_text(html):
    assert XSS not in html
    assert XSS_ESCAPED in html
    assert "<script" not in html.lower()  # the report carries no scripts at all


def test_html_is_self_contained(html):
    assert "<svg" in html
    for match in re.finditer(r"https?://", html):
        before = html[max(0, match.start() - 30):match.start()]
        context = html[match.start() - 60:match.end() + 60]
        assert re.search(r'xmlns(:\w+)?="$', before), f"external reference near: {context!r}"
    assert not re.search(r"<(link|img|iframe|object|embed)\b", html, re.I)
    assert "@import" not in html and "url(http" not in html


def test_html_content_and_plots(html):
    for text in ("smollm2-135m", "Summary per editor", "Suite: single_edit", "Suite: sequential",
                 "Perplexity vs number of edits", "Edited-layer norm growth", "Time per phase",
                 "Perplexity ratio distribution", "Score distributions", "Failures (2)"):
        assert text in html
    assert 'class="outcome-failed"' in html
    assert html.count("<svg") == 5
    # ids of the inline SVGs are unique across the document
    ids = re.findall(r'\bid="([^"]+)"', html)
    assert len(ids) == len(set(ids))


def test_html_leaves_out_plots_without_data():
    run = make_run()
    run["records"] = [r for r in run["records"] if r["suite"] == "single_edit"]
    html = render_html(run)
    assert "Perplexity vs number of edits" not in html
    assert "Edited-layer norm growth" not in html
    assert "Time per phase" in html


def test_html_editor_name_markup_does_not_reach_plots_or_page():
    run = make_run()
    for rec in run["records"]:
        if rec["editor"] == "memit":
            rec["editor"] = '<img src=x onerror="alert(1)">'
    html = render_html(run)
    assert "<img" not in html
    assert "&lt;img src=x" in html


def test_html_renders_minimal_run():
    html = render_html({"schema_version": 1, "records": []})
    assert "No records." in html and "<svg" not in html


def test_write_html_and_cli_report_default_path(tmp_path, capsys):
    out = write_html(make_run(), tmp_path / "sub" / "r.html")
    assert out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    run_json = _write(tmp_path, "run-1.json", make_run())
    assert main(["report", run_json]) == 0
    assert (tmp_path / "run-1.html").is_file()
    assert main(["report", run_json, "-o", str(tmp_path / "x" / "custom.html")]) == 0
    assert (tmp_path / "x" / "custom.html").is_file()
    assert "custom.html" in capsys.readouterr().out


# --------------------------------------------------------------------------- leaderboard


def test_leaderboard_two_models(tmp_path, capsys):
    runs = [make_run("smollm2-135m", "run-a"), make_run("gpt2-xl<b>", "run-b")]
    df = leaderboard(runs)
    assert set(df["model"]) == {"smollm2-135m", "gpt2-xl<b>"}
    assert len(df) == 4 and set(df["editor"]) == {"rome", "memit"}
    # memit has perfect efficacy, rome a failed case: memit ranks first within each model
    for _, part in df.groupby("model"):
        assert list(part["editor"]) == ["memit", "rome"]
    rome = df[(df.model == "smollm2-135m") & (df.editor == "rome")].iloc[0]
    assert rome["n"] == 3 and rome["efficacy"] == pytest.approx(0.5)
    assert rome["edits_to_collapse"] == 30
    assert rome["ppl_ratio"] == pytest.approx(1.02)  # sequential records excluded
    assert rome["downstream_drop"] == pytest.approx(0.02)
    assert rome["time_per_edit_s"] == pytest.approx(1.5)  # sequential records excluded
    memit = df[(df.model == "smollm2-135m") & (df.editor == "memit")].iloc[0]
    assert pd.isna(memit["edits_to_collapse"])

    md_path, html_path = write_leaderboard(runs, tmp_path / "lb")
    md, html = md_path.read_text(encoding="utf-8"), html_path.read_text(encoding="utf-8")
    for text in ("smollm2-135m", "rome", "memit"):
        assert text in md and text in html
    assert "gpt2-xl&lt;b&gt;" in html and "gpt2-xl<b>" not in html
    assert "http://" not in html and "https://" not in html

    paths = [_write(tmp_path, "a.json", runs[0]), _write(tmp_path, "b.json", runs[1])]
    assert main(["leaderboard", *paths, "-o", str(tmp_path / "lb2")]) == 0
    out = capsys.readouterr().out
    assert "| model | editor | score |" in out and "gpt2-xl<b>" in out
    assert (tmp_path / "lb2" / "index.html").is_file()


# --------------------------------------------------------------------------- compare


def test_compare_identical_runs_pass(tmp_path, capsys):
    run = make_run()
    result = compare(run, copy.deepcopy(run))
    assert result.ok and not result.regressions
    assert {r.status for r in result.rows} == {"ok"}
    assert "efficacy_success" in result.to_markdown()
    path = _write(tmp_path, "run.json", run)
    assert main(["compare", path, path]) == 0
    assert "OK: 0 regression(s)" in capsys.readouterr().out


def test_compare_efficacy_drop_regresses(tmp_path, capsys):
    base = make_run()
    worse = _degrade(base, "memit", efficacy_success=lambda v: v - 0.3)
    result = compare(base, worse)
    assert not result.ok
    assert {(r.suite, r.editor, r.metric) for r in result.regressions} == {("single_edit", "memit", "efficacy_success")}
    assert result.regressions[0].change == pytest.approx(-0.3)
    assert "**REGRESSED**" in result.to_markdown()
    # a looser tolerance accepts it
    assert compare(base, worse, {"score": 0.5}).ok
    assert main(["compare", _write(tmp_path, "b.json", base), _write(tmp_path, "r.json", worse)]) == 1
    assert "REGRESSION" in capsys.readouterr().out


def test_compare_ppl_ratio_rise_regresses(tmp_path):
    base = make_run()
    worse = _degrade(base, "rome", ppl_ratio=lambda v: v * 3)
    metrics = {r.metric for r in compare(base, worse).regressions}
    assert metrics == {"ppl_ratio"}
    assert main(["compare", _write(tmp_path, "b.json", base), _write(tmp_path, "r.json", worse)]) == 1


def test_compare_improvement_is_not_a_regression():
    base = _degrade(make_run(), "memit", efficacy_success=lambda v: v - 0.3)
    result = compare(base, make_run())
    assert result.ok
    assert [r.metric for r in result.improvements] == ["efficacy_success"]


def test_compare_missing_editor_and_collapse(tmp_path):
    base = make_run()
    run = copy.deepcopy(base)
    run["records"] = [r for r in run["records"] if r["editor"] != "memit"]
    result = compare(base, run)
    assert {(r.editor, r.status) for r in result.regressions} == {("memit", "missing")}
    # memit never collapsed in the baseline; collapsing now is a regression
    collapsed = copy.deepcopy(base)
    collapsed["records"][-1]["metrics"]["edits_to_collapse"] = 40
    rows = [r for r in compare(base, collapsed).regressions if r.metric == "edits_to_collapse"]
    assert [(r.editor, r.baseline, r.current) for r in rows] == [("memit", float("inf"), 40.0)]


def test_compare_timing_tolerance(tmp_path):
    base = make_run()
    slow = copy.deepcopy(base)
    for rec in slow["records"]:
        rec["timings"] = {k: v * 2 for k, v in rec["timings"].items()}
    regressed = {r.metric for r in compare(base, slow).regressions}
    assert "timings.edit" in regressed and "timings.restore" not in regressed  # 10 ms is below the floor
    assert compare(base, slow, {"time": None}).ok
    b, r = _write(tmp_path, "b.json", base), _write(tmp_path, "r.json", slow)
    assert main(["compare", b, r]) == 1
    assert main(["compare", b, r, "--tol-time", "none"]) == 0
    assert main(["compare", b, r, "--tol-time", "1.5"]) == 0


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("content, expected", [
    (None, "no such file"),
    ("{not json", "not valid JSON"),
    (json.dumps({"schema_version": 99, "records": []}), "schema_version 99"),
    (json.dumps([1, 2]), "expected a JSON object"),
    (json.dumps({"schema_version": 1, "records": "x"}), "'records' must be a list"),
])
@pytest.mark.parametrize("command", ["report", "compare", "leaderboard"])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, content, expected, command):
    bad = tmp_path / "bad.json"
    if content is not None:
        bad.write_text(content, encoding="utf-8")
    good = _write(tmp_path, "good.json", make_run())
    argv = {
        "report": ["report", str(bad)],
        "compare": ["compare", good, str(bad)],
        "leaderboard": ["leaderboard", good, str(bad), "-o", str(tmp_path / "lb")],
    }[command]
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "\n" not in err and expected in err and "bad.json" in err
    assert "Traceback" not in captured.err


def test_load_runs_names_the_bad_file(tmp_path):
    good = _write(tmp_path, "good.json", make_run())
    with pytest.raises(RunFileError, match=r"missing\.json: no such file"):
        load_runs([good, tmp_path / "missing.json"])
    assert len(load_runs([good, good])) == 2
