"""Fast tests for harness.report (HTML, leaderboard, compare) and the harness CLI, on synthetic runs."""

from __future__ import annotations

import copy
import json
import re

import pytest

from harness.cli import main
from harness.metrics.registry import summarize
from harness.report import RunFileError
from harness.report.compare import compare
from harness.report.html import render_html, write_html
from harness.report.leaderboard import (
    board_tables,
    leaderboard,
    load_runs,
    to_markdown,
    write_leaderboard,
)

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


def make_provenance(dataset: str = "builtin", sha: str = "a" * 64, case_ids=("b01", "b02", "b03"),
                    memit_lambda: float = 1500.0) -> dict:
    return {
        "harness": {"version": "0.1.0", "git_commit": "0123abcd" * 5, "git_dirty": False, "source": "/src"},
        "editors": {
            "rome": {"hparams": {"layer": 5, "v_num_grad_steps": 20, "note": XSS}, "family": "llama",
                     "overrides": {}, "files": [{"path": "hparams/rome/default.yaml", "sha256": "f" * 64}]},
            "memit": {"hparams": {"layers": [4, 5], "mom2_update_weight": memit_lambda}, "family": "llama",
                      "overrides": {"mom2_update_weight": str(memit_lambda)},
                      "files": [{"path": "hparams/memit/llama.yaml", "sha256": "e" * 64}]},
        },
        "dataset": {"spec": dataset, "requested": dataset, "kind": "builtin", "path": f"/data/{dataset}.json",
                    "sha256": sha, "n_cases": len(case_ids), "case_ids": list(case_ids)},
        "corpora": {"perplexity": {"spec": "builtin-sentences", "path": None, "sha256": None, "texts": 50,
                                   "tokens": 1234},
                    "statistics": {"spec": "builtin", "path": "/x/passages.json", "sha256": "c" * 64,
                                   "tokens_requested": 100000, "tokens_used": 23456}},
        "seeds": {"bootstrap": 20240601, "tracing_noise": 1},
    }


def make_run(model: str = "smollm2-135m", run_id: str = "20261121-063012-ab12", schema: int = 2,
             dataset: str = "builtin") -> dict:
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
    run = {
        "schema_version": schema, "run_id": run_id,
        "started": "2026-11-21T06:30:12+00:00", "finished": "2026-11-21T06:35:12+00:00", "duration_s": 300.0,
        "model": {"name": model, "family": "llama", "model_type": "llama", "fingerprint": "abc123",
                  "dtype": "float32", "n_params": 134_515_008, "n_layers": 30, "source": "embedded"},
        "machine": {"hostname": "ci", "platform": "Linux", "python": "3.11.7", "torch": "2.5.0",
                    "transformers": "4.46.0", "cpu_count": 16, "device": "cpu",
                    "gpu_name": None, "cuda": None, "driver": None},
        "config": {"editors": ["rome", "memit"], "dataset": dataset,
                   "thresholds": {"collapse_ppl_ratio": 2.0, "min_efficacy": 1.0},
                   "hparams": {"rome": {"layers": [5], "note": XSS}}, "argv": ["pytest", "-k", XSS]},
        "records": records,
    }
    if schema == 1:
        run["summary"] = {"rome": {"n": 4, "passed": 1}, "memit": {"n": 3, "passed": 3}}
    else:
        run["provenance"] = make_provenance(dataset)
        run["summary"] = [g.to_json() for g in summarize(records)]
    return run


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


def _many_cases(editor: str = "rome", n: int = 12, efficacy=lambda i: 1.0, ppl=lambda i: 1.0 + 0.001 * i,
                edit_s=lambda i: 2.0 + 0.1 * i, dataset: str = "builtin") -> dict:
    """A run of one editor on n single-edit cases (for paired comparisons that can reach significance)."""
    run = make_run(dataset=dataset)
    run["records"] = []
    for i in range(n):
        rec = _single(editor, f"c{i:02d}", f"subject {i}", efficacy=efficacy(i), ppl_ratio=ppl(i))
        rec["timings"]["edit"] = edit_s(i)
        run["records"].append(rec)
    run["summary"] = [g.to_json() for g in summarize(run["records"])]
    return run


# --------------------------------------------------------------------------- HTML


@pytest.fixture(scope="module")
def html() -> str:
    """The report of make_run(), rendered once for the tests that only read it."""
    return render_html(make_run())


def _script_blocks(page: str) -> list[str]:
    return re.findall(r"<script\b[^>]*>(.*?)</script>", page, flags=re.S | re.I)


def test_html_escapes_dataset_text(html):
    assert XSS not in html
    assert XSS_ESCAPED in html
    scripts = _script_blocks(html)
    assert len(scripts) == 1 and len(re.findall(r"<script", html, re.I)) == 1   # only the static sort/filter code
    assert "alert" not in scripts[0] and "Paris" not in scripts[0]              # it carries no run data


def test_html_is_self_contained(html):
    assert "<svg" in html
    for match in re.finditer(r"https?://", html):
        before = html[max(0, match.start() - 30):match.start()]
        context = html[match.start() - 60:match.end() + 60]
        assert re.search(r'xmlns(:\w+)?="$', before), f"external reference near: {context!r}"
    assert not re.search(r"<(link|img|iframe|object|embed)\b", html, re.I)
    assert "@import" not in html and "url(http" not in html


def test_html_content_and_plots(html):
    for text in ("smollm2-135m", "<h2>Summary</h2>", "<h3>single_edit</h3>", "Suite: single_edit",
                 "Suite: sequential", "Perplexity vs number of edits", "Edited-layer weights: mean |W|",
                 "Time per phase", "Perplexity ratio per edit", "Distribution: ES (efficacy_success)",
                 "Distribution: PS (paraphrase_success)", "Failures (2)", "<h2>Provenance</h2>"):
        assert text in html, text
    # failures first: before the summary; within a suite table the failed record is the first row
    assert html.index("Failures (2)") < html.index("<h2>Summary</h2>") < html.index("Suite: single_edit")
    single = html[html.index("Suite: single_edit"):html.index("Suite: sequential")]
    assert single.index("outcome-failed") < single.index("outcome-passed")
    assert 'class="outcome-failed"' in html
    ids = re.findall(r'\bid="([^"]+)"', html)       # ids of the inline SVGs are unique across the document
    assert len(ids) == len(set(ids))


def test_html_summary_has_intervals_n_and_registry_tooltips(html):
    # rome's efficacy over its two non-skipped cases (1 and 0): mean 0.5, bootstrap interval [0, 1]
    assert ">0.5 [0, 1]<" in html
    assert 'title="efficacy_success: P(new) &gt; P(true) on the rewrite prompt; unit: fraction; higher is better' in html
    assert 'title="timings.edit: seconds per record in the edit phase (median over records)' in html
    assert 'data-v="0.5"' in html                       # sortable by value, not by the text with its interval


def test_html_provenance_section(html):
    prov = html[html.index("<h2>Provenance</h2>"):]
    for text in ("0123abcd", "hparams/rome/default.yaml", "f" * 64, "/data/builtin.json", "b01, b02, b03",
                 "tokens_used", "23456", "bootstrap", "mom2_update_weight", "Editor: memit"):
        assert text in prov, text
    assert XSS not in prov


def test_html_of_a_schema_1_run_says_it_has_no_provenance():
    html = render_html(make_run(schema=1), plots=False)
    assert "has no provenance" in html and "Summary" in html


def test_html_leaves_out_plots_without_data():
    run = make_run()
    run["records"] = [r for r in run["records"] if r["suite"] == "single_edit"]
    html = render_html(run)
    assert "Perplexity vs number of edits" not in html
    assert "Edited-layer weights" not in html
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
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["r.html"]     # no temporary file left behind
    run_json = _write(tmp_path, "run-1.json", make_run())
    assert main(["report", run_json]) == 0
    assert (tmp_path / "run-1.html").is_file()
    assert main(["report", run_json, "-o", str(tmp_path / "x" / "custom.html")]) == 0
    assert (tmp_path / "x" / "custom.html").is_file()
    assert "custom.html" in capsys.readouterr().out


# --------------------------------------------------------------------------- plots: what the axes show


def _drawn(fig):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return canvas.get_renderer()


def test_ppl_ratio_axis_is_zoomed_so_close_ratios_read_differently():
    from harness.report.html import plot_ppl_ratio
    recs = [_single("rome", "a", "x", ppl_ratio=0.998), _single("rome", "b", "y", ppl_ratio=1.008),
            _single("memit", "a", "x", ppl_ratio=1.001)]
    fig = plot_ppl_ratio(recs, ["rome", "memit"], collapse_ratio=2.0)
    ax = fig.axes[0]
    low, high = ax.get_ylim()
    assert 0.98 < low < 0.998 and 1.008 < high < 1.03          # zoomed on the data, not stretched to 2.0
    _drawn(fig)
    labels = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
    assert len(labels) >= 3 and len(set(labels)) == len(labels)           # no offset text, no repeated labels
    assert ax.yaxis.get_offset_text().get_text() == ""
    formatter = ax.yaxis.get_major_formatter()
    assert formatter(0.998, 0) not in ("", formatter(1.008, 0))
    assert ax.get_yscale() == "linear"
    notes = [t.get_text() for t in ax.texts]
    assert notes == ["collapse threshold x2 above the axis"]


def test_collapsed_ratios_get_a_log_axis_with_the_threshold_line():
    from harness.report.html import plot_ppl_ratio
    recs = [_single("rome", "a", "x", ppl_ratio=1.0), _single("rome", "b", "y", ppl_ratio=3740.0)]
    ax = plot_ppl_ratio(recs, ["rome"], collapse_ratio=2.0).axes[0]
    assert ax.get_yscale() == "log"
    assert any(line.get_linestyle() == "--" and line.get_ydata()[0] == 2.0 for line in ax.lines)


def test_edit_count_axis_has_integer_ticks_and_legend_beside_the_data():
    from harness.report.html import plot_ppl_curves, plot_series
    recs = [_sequential("rome", collapse_at=None, growth=0.1)]
    for rec in recs:
        rec["metrics"]["ppl_curve"] = [[n, 20.0 + n] for n in range(4)]
        rec["metrics"]["norm_l1"] = [[n, 0.14 + 0.001 * n] for n in range(4)]
    for fig in (plot_ppl_curves(recs, ["rome"], 2.0), plot_series(recs, ["rome"], "norm_l1", "mean |W| of the edited weight")):
        ax = fig.axes[0]
        renderer = _drawn(fig)
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks)
        legend = ax.get_legend()
        assert legend is not None
        assert legend.get_window_extent(renderer).x0 >= ax.get_window_extent(renderer).x1 - 1   # right of the axes
    assert plot_series(recs, ["rome"], "norm_l1", "mean |W| of the edited weight").axes[0].get_ylabel() == \
        "mean |W| of the edited weight"


def test_score_panels_are_one_figure_per_score_with_mean_and_interval():
    from harness.report.html import plot_score_panel, score_panel_metrics
    recs = [r for r in make_run()["records"] if r["suite"] == "single_edit" and r["metrics"]]
    names = score_panel_metrics(recs)
    assert names == ["efficacy_success", "paraphrase_success", "neighborhood_success"]
    ax = plot_score_panel(recs, ["rome", "memit"], "efficacy_success").axes[0]
    assert len(ax.containers) == 2                       # an error bar (mean with its interval) per editor
    assert ax.get_ylim() == (-0.05, 1.05)


# --------------------------------------------------------------------------- leaderboard


def test_leaderboard_one_table_per_model_dataset_and_suite(tmp_path, capsys):
    runs = [make_run("smollm2-135m", "run-a"), make_run("smollm2-135m", "run-b", dataset="counterfact"),
            make_run("gpt2-xl<b>", "run-c")]
    runs[1]["provenance"]["dataset"]["sha256"] = "b" * 64
    tables = board_tables(runs, min_n=2)
    titles = [t.title for t in tables]
    assert titles == sorted(titles) and len(titles) == 6      # 3 (model, dataset) pairs x 2 suites
    assert "smollm2-135m / builtin (sha256 aaaaaaaaaaaa) / single_edit" in titles
    assert "smollm2-135m / counterfact (sha256 bbbbbbbbbbbb) / single_edit" in titles
    single = next(t for t in tables if t.title.startswith("smollm2-135m / builtin") and t.suite == "single_edit")
    assert [r.editor for r in single.rows] == ["memit", "rome"]       # memit: ES 1 [1, 1]; rome: 0.5 [0, 1]
    rome = single.rows[1]
    assert rome.n == 2 and rome.rank == 2 and rome.score.value == pytest.approx(0.5)
    assert (rome.score.low, rome.score.high) == (0.0, 1.0)
    assert rome.metrics["ppl_ratio"].value == pytest.approx(1.02)     # single-edit records only
    seq = next(t for t in tables if t.title.startswith("smollm2-135m / builtin") and t.suite == "sequential")
    assert {r.editor: r.rank for r in seq.rows} == {"memit": None, "rome": None}    # n = 1 < min_n: listed only

    md_path, html_path = write_leaderboard(runs, tmp_path / "lb", min_n=2)
    md, page = md_path.read_text(encoding="utf-8"), html_path.read_text(encoding="utf-8")
    assert md.count("\n## ") == 6 and page.count("<h2>") == 7          # + the runs table
    assert "gpt2-xl\\<b\\>" in md and "gpt2-xl<b>" not in md          # escaped in markdown too
    assert "gpt2-xl&lt;b&gt;" in page and "gpt2-xl<b>" not in page
    assert "http://" not in page and "https://" not in page
    assert "0.5 [0, 1]" in md and "rome (collapsed)" in md

    paths = [_write(tmp_path, f"{r['run_id']}.json", r) for r in runs]
    assert main(["leaderboard", *paths, "-o", str(tmp_path / "lb2"), "--min-n", "1"]) == 0
    out = capsys.readouterr().out
    assert "| rank | editor | n | runs | collapsed | score (ES) |" in out and "(collapsed)" in out
    assert (tmp_path / "lb2" / "index.html").is_file()


def test_leaderboard_does_not_reward_collapse_and_respects_min_n():
    run = _many_cases("rome", n=6, ppl=lambda i: 1.0)
    worse_but_intact = _many_cases("memit", n=6, efficacy=lambda i: 0.5 if i % 2 else 1.0, ppl=lambda i: 1.0)
    collapsed = _many_cases("ft", n=6, ppl=lambda i: 3.0 if i == 0 else 1.0)        # ES 1.0 but one collapse
    few = _many_cases("r_rome", n=2, ppl=lambda i: 1.0)
    run["records"] += worse_but_intact["records"] + collapsed["records"] + few["records"]
    table = board_tables([run], min_n=5)[0]
    assert [(r.editor, r.rank, r.collapsed) for r in table.rows] == [
        ("rome", 1, 0), ("memit", 2, 0), ("ft_l", 3, 1), ("r_rome", None, 0)]
    df = leaderboard([run], min_n=5)
    assert list(df["rank"].astype("object").where(df["rank"].notna(), None)) == [1, 2, 3, None]


def test_leaderboard_ranks_streams_by_their_edits():
    """A sequential table has one record (stream) per editor: a stream of n_edits >= min_n edits is ranked (n says
    both), a shorter one is listed only; a collapsed stream ranks below an intact one."""
    run = make_run()
    run["records"] = [_sequential("rome", collapse_at=30, growth=0.8), _sequential("memit", None, 0.1),
                      _sequential("grace", None, 0.0), _sequential("emmet", None, 0.2)]
    for rec, n in zip(run["records"], (50, 50, 3, 50)):
        rec["metrics"]["n_edits"] = n
    (table,) = board_tables([run], min_n=5)
    # memit and emmet tie on the score (ES final 0.9): the smaller perplexity ratio (memit's) ranks first
    assert [(r.editor, r.rank, r.n, r.edits) for r in table.rows] == [
        ("memit", 1, 1, 50), ("emmet", 2, 1, 50), ("rome", 3, 1, 50), ("grace", None, 1, 3)]
    md = to_markdown([table], min_n=5)
    assert "| 1 | memit | 1 (50 edits) |" in md and "a sequential stream counts its edits" in md


def test_leaderboard_counts_a_case_once_and_splits_hyperparameter_settings():
    a, b = make_run(run_id="a"), make_run(run_id="b")
    table = next(t for t in board_tables([a, copy.deepcopy(a)], min_n=1) if t.suite == "single_edit")
    assert {r.editor: r.n for r in table.rows} == {"rome": 2, "memit": 2}    # the same cases twice: counted once
    b["provenance"]["editors"]["memit"]["hparams"]["mom2_update_weight"] = 15000.0
    b["started"] = "2026-11-22T00:00:00+00:00"
    table = next(t for t in board_tables([a, b], min_n=1) if t.suite == "single_edit")
    memits = sorted(r.editor for r in table.rows if r.editor.startswith("memit"))
    assert len(memits) == 2 and all(re.fullmatch(r"memit@[0-9a-f]{6}", m) for m in memits)


def test_leaderboard_reads_schema_1_runs():
    tables = board_tables([make_run(schema=1)], min_n=1)
    assert {t.dataset for t in tables} == {"builtin"}
    assert {r.editor for t in tables for r in t.rows} == {"rome", "memit"}


# --------------------------------------------------------------------------- compare


def test_compare_identical_runs_pass(tmp_path, capsys):
    run = make_run()
    result = compare(run, copy.deepcopy(run))
    assert result.ok and not result.regressions and result.refused is None
    assert {r.status for r in result.rows} == {"ok"}
    assert "efficacy_success" in result.to_markdown()
    assert "ppl_before" in result.not_compared            # no direction in the registry: listed, not compared
    path = _write(tmp_path, "run.json", run)
    assert main(["compare", path, path]) == 0
    assert "OK: 0 regression(s)" in capsys.readouterr().out


def test_compare_significant_efficacy_drop_regresses_with_interval(tmp_path, capsys):
    base = _many_cases()
    worse = _many_cases(efficacy=lambda i: 0.0 if i % 3 else 1.0)          # 8 of 12 cases lose the edit
    result = compare(base, worse)
    assert not result.ok
    row = next(r for r in result.regressions if r.metric == "efficacy_success")
    assert row.change == pytest.approx(-8 / 12) and row.n == 12
    assert row.low < row.change < row.high < 0
    assert main(["compare", _write(tmp_path, "b.json", base), _write(tmp_path, "r.json", worse)]) == 1
    out = capsys.readouterr().out
    assert re.search(r"\| efficacy_success \| 12 \| 1 \| 0\.3333 \| -0\.6667 \[-0\.\d+, -0\.\d+\] \| 0\.05 \| "
                     r"\*\*REGRESSED\*\* \|", out), out
    assert compare(base, worse, {"score": 0.7}).ok                        # a looser tolerance accepts it


def test_compare_drop_on_one_case_is_beyond_tolerance_but_not_significant():
    base = _many_cases(n=10)
    one = _many_cases(n=10, efficacy=lambda i: 0.0 if i == 0 else 1.0)   # mean -0.1, but one case of ten
    result = compare(base, one)
    row = next(r for r in result.rows if r.metric == "efficacy_success")
    assert row.change == pytest.approx(-0.1) and row.status == "not significant" and row.high == 0.0
    assert result.ok and "1 change(s) beyond tolerance but not significant" in result.summary()


def test_compare_ppl_ratio_rise_regresses(tmp_path):
    base = _many_cases()
    worse = _many_cases(ppl=lambda i: 1.3 + 0.001 * i)
    metrics = {r.metric for r in compare(base, worse).regressions}
    assert metrics == {"ppl_ratio", "ppl_after"}
    assert main(["compare", _write(tmp_path, "b.json", base), _write(tmp_path, "r.json", worse)]) == 1


def test_compare_improvement_is_not_a_regression():
    base = _many_cases(efficacy=lambda i: 0.0 if i % 2 else 1.0)
    result = compare(base, _many_cases())
    assert result.ok
    assert [r.metric for r in result.improvements] == ["efficacy_success"]


def test_compare_latency_is_judged_on_medians(tmp_path):
    base = _many_cases()
    slow = _many_cases(edit_s=lambda i: 2 * (2.0 + 0.1 * i))
    row = next(r for r in compare(base, slow).regressions if r.metric == "timings.edit")
    assert row.baseline == pytest.approx(2.55) and row.current == pytest.approx(5.1)   # medians
    assert row.change == pytest.approx(1.0) and row.low > 0.5
    one_slow = _many_cases(edit_s=lambda i: 60.0 if i == 0 else 2.0 + 0.1 * i)        # an outlier: median unmoved
    assert compare(base, one_slow).ok
    assert compare(base, slow, {"time": None}).ok
    b, r = _write(tmp_path, "b.json", base), _write(tmp_path, "r.json", slow)
    assert main(["compare", b, r]) == 1
    assert main(["compare", b, r, "--tol-time", "none"]) == 0
    assert main(["compare", b, r, "--tol-time", "1.5"]) == 0


def test_compare_missing_editor_and_collapse():
    base = make_run()
    run = copy.deepcopy(base)
    run["records"] = [r for r in run["records"] if r["editor"] != "memit"]
    result = compare(base, run)
    assert {(r.editor, r.status) for r in result.regressions} == {("memit", "missing")}
    collapsed = copy.deepcopy(base)      # memit never collapsed in the baseline; collapsing now is a regression
    collapsed["records"][-1]["metrics"]["edits_to_collapse"] = 40
    rows = [r for r in compare(base, collapsed).regressions if r.metric == "edits_to_collapse"]
    assert [(r.editor, r.baseline, r.current) for r in rows] == [("memit", float("inf"), 40.0)]


@pytest.mark.parametrize("lost", [None, "n/a", [1, 2]])
def test_compare_reports_a_metric_that_is_not_a_number(tmp_path, capsys, lost):
    base = _many_cases()
    run = copy.deepcopy(base)
    run["records"][3]["metrics"]["efficacy_success"] = lost
    result = compare(base, run)
    assert [(r.metric, r.status, r.n) for r in result.regressions] == [("efficacy_success", "not a number", 1)]
    assert main(["compare", _write(tmp_path, "b.json", base), _write(tmp_path, "r.json", run)]) == 1
    assert "**NOT A NUMBER**" in capsys.readouterr().out


def test_compare_matches_records_by_case_not_by_position():
    base = _many_cases()
    run = copy.deepcopy(base)
    run["records"].reverse()
    for rec in run["records"]:
        rec["nodeid"] = "elsewhere/" + rec["nodeid"]            # another checkout path: same test id
    run["records"] = run["records"][2:]                         # and two cases fewer
    result = compare(base, run)
    assert result.ok and {r.n for r in result.rows if r.metric == "efficacy_success"} == {10}
    assert any("2 of 12 baseline cases are not in the run" in note for note in result.notes)


@pytest.mark.parametrize("change, reason", [
    (lambda r: r["provenance"]["dataset"].update(spec="counterfact", requested="counterfact"), "dataset differs"),
    (lambda r: r["provenance"]["dataset"].update(sha256="9" * 64), "dataset file differs"),
    (lambda r: r["model"].update(name="gpt2-xl"), "model differs"),
    (lambda r: r["model"].update(fingerprint="zzz"), "model weights differ"),
    (lambda r: r["config"]["thresholds"].update(collapse_ppl_ratio=1.5), "thresholds differ (collapse_ppl_ratio 2.0"),
    (lambda r: r["provenance"]["corpora"]["perplexity"].update(spec="me-ppl-50"), "perplexity corpus differs"),
])
def test_compare_refuses_runs_that_are_not_like_for_like(tmp_path, capsys, change, reason):
    base = make_run()
    other = copy.deepcopy(base)
    change(other)
    result = compare(base, other)
    assert result.refused and reason in result.refused and not result.ok and not result.rows
    b, r = _write(tmp_path, "b.json", base), _write(tmp_path, "r.json", other)
    assert main(["compare", b, r]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "\n" not in err and reason in err and "--allow-different" in err and captured.out == ""
    assert main(["compare", b, r, "--allow-different"]) == 0
    assert reason in capsys.readouterr().out                    # said, as a note


def test_compare_reads_a_schema_1_baseline():
    base, run = make_run(schema=1), make_run()
    result = compare(base, run)
    assert result.refused is None and result.ok
    assert result.refused is None and compare(base, make_run(dataset="zsre")).refused


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("content, expected", [
    (None, "no such file"),
    ("{not json", "not valid JSON"),
    (json.dumps({"schema_version": 99, "records": []}), "schema_version 99"),
    (json.dumps([1, 2]), "expected a JSON object"),
    (json.dumps({"schema_version": 1, "records": "x"}), "'records' must be a list"),
    (json.dumps({"schema_version": 2, "records": []}), "does not match the run schema 2: at $: 'run_id' is a "
                                                       "required property"),
    (json.dumps({"schema_version": 1, "records": [{"outcome": "exploded"}]}), "at $.records[0].outcome"),
])
@pytest.mark.parametrize("command", ["report", "compare", "leaderboard", "export"])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, content, expected, command):
    bad = tmp_path / "bad.json"
    if content is not None:
        bad.write_text(content, encoding="utf-8")
    good = _write(tmp_path, "good.json", make_run())
    argv = {
        "report": ["report", str(bad)],
        "compare": ["compare", good, str(bad)],
        "leaderboard": ["leaderboard", good, str(bad), "-o", str(tmp_path / "lb")],
        "export": ["export", str(bad)],
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


def test_compare_says_but_does_not_refuse_another_statistics_corpus():
    base = make_run()
    other = copy.deepcopy(base)
    other["provenance"]["corpora"]["statistics"].update(spec="model-samples", sha256=None, tokens_used=100000)
    result = compare(base, other)
    assert result.ok and not result.refused
    assert any("key statistics corpus differs (spec builtin" in n and "spec model-samples" in n for n in result.notes)
    used_only = copy.deepcopy(base)                              # what a process used is not a setting
    used_only["provenance"]["corpora"]["statistics"]["tokens_used"] = 99999
    used_only["provenance"]["corpora"]["perplexity"]["tokens"] = 999
    assert not compare(base, used_only).notes and compare(base, used_only).ok
