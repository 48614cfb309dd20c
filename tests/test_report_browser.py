"""The HTML report in a real browser: headless Chromium (scripts/render_report.py) loads it from disk with no
network, logs no console errors, and screenshots it; its DOM has the tables and the inline SVG plots. The report
is built from the synthetic run of tests/test_report.py (two editors, failures, sequential curves, markup in
dataset text). Skipped where no Chromium is installed (Debian: ``apt-get install -y chromium``)."""
from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from harness.report.html import write_html
from tests.test_report import XSS, make_run

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "render_report.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("render_report", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("render_report", module)
    spec.loader.exec_module(module)
    return module


rr = _load_script()
needs_chromium = pytest.mark.skipif(rr.find_chromium() is None,
                                    reason="chromium is not installed (apt-get install -y chromium, or set "
                                           "CHROMIUM=/path/to/chrome): the browser rendering tests need it")


@pytest.fixture(scope="module")
def report_html(tmp_path_factory) -> Path:
    return write_html(make_run(), tmp_path_factory.mktemp("browser") / "report.html")


@pytest.fixture(scope="module")
def rendered(report_html):
    return rr.render(report_html, report_html.with_suffix(".png"))


@needs_chromium
def test_report_renders_without_console_errors(rendered):
    assert rendered.errors == [] and rendered.ok
    assert rendered.blocked == []        # the report asked for nothing outside the file


@needs_chromium
def test_screenshot_is_a_real_picture(rendered):
    import matplotlib.image

    png = rendered.png
    assert png is not None and png.is_file()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 20_000
    img = matplotlib.image.imread(png)
    assert img.shape[1] == rendered.width == 1280 and img.shape[0] == rendered.height > 900
    rgb = img[..., :3]
    ink = np.any(rgb < 0.9, axis=-1).mean()          # share of pixels that are not (near) white
    assert 0.01 < ink < 0.9, f"screenshot looks blank or flooded: {ink:.3f} of the pixels are ink"
    assert len(np.unique(rgb.reshape(-1, 3), axis=0)) > 50    # text, plot colours, badges: not a flat page


@needs_chromium
def test_dom_has_tables_and_svg_plots(report_html, rendered):
    dom = rr.dump_dom(report_html)           # what `chromium --headless --dump-dom` prints
    for text in (dom, rendered.dom):
        assert text.count("<svg") == 7       # ppl curve, ppl ratio, mean |W|, ES, PS and NS panels, timings
        assert text.count("<table") >= 7
        for title in ("<h2>Summary</h2>", "Suite: single_edit", "Suite: sequential", "<h2>Provenance</h2>"):
            assert title in text
        assert XSS not in text and text.count("<script") == 1    # the dataset text stayed text
    # the inline script ran: one filter box per sortable table, and no console errors (checked above)
    sortable = re.findall(r'<table class="sortable\b', rendered.dom)
    assert rendered.dom.count('class="filter"') == len(sortable) >= 5


@needs_chromium
def test_errors_and_network_requests_are_caught(tmp_path):
    page = tmp_path / "bad.html"
    page.write_text('<!DOCTYPE html><html><body><p>x</p><img src="http://example.com/a.png">'
                    '<script>console.warn("just a warning"); console.error("boom"); missingFunction();</script>'
                    '</body></html>', encoding="utf-8")
    res = rr.render(page, tmp_path / "bad.png")
    assert res.blocked == ["http://example.com/a.png"]
    assert any(e == "console.error: boom" for e in res.errors)
    assert any("missingFunction" in e for e in res.errors)
    assert not any("just a warning" in e for e in res.errors) and any("just a warning" in w for w in res.warnings)
    assert (tmp_path / "bad.png").is_file()

    cli = subprocess.run([sys.executable, str(SCRIPT), str(page), "-o", str(tmp_path / "cli.png")],
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 1
    err = cli.stderr.strip()
    assert "\n" not in err and "error(s) loading" in err and "boom" in err


@needs_chromium
def test_cli_writes_png(report_html, tmp_path):
    out = tmp_path / "docs" / "report.png"
    cli = subprocess.run([sys.executable, str(SCRIPT), str(report_html), "-o", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    assert out.is_file() and f"wrote {out}" in cli.stdout


def test_missing_browser_is_one_line_exit_2(report_html, tmp_path):
    """Needs no browser: the script names what is missing and how to install it."""
    cli = subprocess.run([sys.executable, str(SCRIPT), str(report_html), "-o", str(tmp_path / "x.png")],
                         capture_output=True, text=True, timeout=60,
                         env={"PATH": str(tmp_path), "CHROMIUM": str(tmp_path / "no-such-chromium")})
    assert cli.returncode == 2
    err = cli.stderr.strip()
    assert "\n" not in err and "chromium not found" in err and "apt-get install -y chromium" in err
    assert not (tmp_path / "x.png").exists()


def test_missing_file_is_one_line_exit_2(tmp_path):
    cli = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "nope.html")],
                         capture_output=True, text=True, timeout=60)
    assert cli.returncode == 2 and cli.stderr.strip() == f"render_report: {tmp_path / 'nope.html'}: no such file"


# --------------------------------------------------------------------------- layout at 1280 px (issue 26, item 5)

# Measured in the loaded page at a 1280 px viewport. A "failed record" is a failed row of the failures table, or the
# <tbody> of a failed record in a suite table (its row and the message row under it). A table "fits" when its right
# edge is inside its box; otherwise its nearest box that scrolls sideways must lie inside the viewport. Then every
# such box is scrolled to its right end, to see that the messages and the first column stay in view.
LAYOUT_PROBE = r"""(() => {
  const vw = window.innerWidth;
  const scroller = (el) => {
    for (let p = el.parentElement; p && p !== document.body; p = p.parentElement) {
      const o = getComputedStyle(p).overflowX;
      if (o === "auto" || o === "scroll") return p;
    }
    return null;
  };
  const box = (el) => {
    const r = el.getBoundingClientRect();
    return {left: r.left, right: r.right, width: r.width, height: r.height};
  };
  const failed = Array.from(document.querySelectorAll("tr.outcome-failed, tr.outcome-error"))
    .filter((tr) => tr.querySelector(".badge"))
    .map((tr) => {
      const unit = tr.parentElement.classList.contains("record") ? tr.parentElement : tr;
      const msg = unit.querySelector(".msg");
      const cs = msg && getComputedStyle(msg);
      return {text: (msg ? msg.textContent : "").trim().slice(0, 80), unit: box(unit), row: box(tr),
              msg: msg ? box(msg) : null, lineHeight: cs ? parseFloat(cs.lineHeight) : 0,
              textHeight: cs ? msg.clientHeight - parseFloat(cs.paddingTop) - parseFloat(cs.paddingBottom) : 0,
              table: box(tr.closest("table")), scroller: box(scroller(tr) || document.body)};
    });
  const tables = Array.from(document.querySelectorAll("table")).map((t) => {
    const s = scroller(t);
    return {table: box(t), scroller: s ? box(s) : null, cls: s ? s.className : "",
            fits: t.getBoundingClientRect().right <= (s || document.body).getBoundingClientRect().right + 0.5};
  });
  const beyond = [];
  for (const el of document.body.querySelectorAll("*")) {
    const r = el.getBoundingClientRect();
    if (r.width === 0 || r.right <= vw + 0.5) continue;
    const s = scroller(el);
    if (s && s.getBoundingClientRect().right <= vw + 0.5) continue;       // it scrolls inside its own box
    beyond.push(el.tagName.toLowerCase() + "." + el.className + " right=" + Math.round(r.right));
  }
  const scrolled = [];
  for (const s of document.querySelectorAll(".scroll")) {
    if (s.scrollWidth <= s.clientWidth) continue;
    s.scrollLeft = s.scrollWidth;
    const sr = s.getBoundingClientRect();
    for (const el of s.querySelectorAll("tr.msg-row .msg, tbody > tr:not(.msg-row) > td:first-child")) {
      const r = el.getBoundingClientRect();
      scrolled.push({what: el.className || el.tagName, left: r.left, right: r.right,
                     boxLeft: sr.left, boxRight: sr.right});
    }
    s.scrollLeft = 0;
  }
  return {vw, scrollWidth: document.documentElement.scrollWidth, failed, tables, beyond, scrolled};
})()"""

WIDE_METRICS = ["paraphrase_magnitude", "neighborhood_magnitude", "rome_score", "rewrite_acc", "rephrase_acc",
                "locality_acc", "ppl_token_after", "ppl_token_before", "neighborhood_retained", "kl_unrelated",
                "top1_changed", "downstream_hellaswag_before", "downstream_hellaswag_after",
                "downstream_arc_easy_before", "downstream_arc_easy_after", "downstream_piqa_drop"]
LONG_MESSAGE = ("AssertionError: efficacy_success 0.0 < min_efficacy 1.0 for case {case} (subject 'Danielle Darrieux', "
                "target_new 'English' vs target_true 'French'): p(new)=0.0123 p(true)=0.4567 after the edit of layer 5")


def wide_run() -> dict:
    """make_run() grown to what a real run looks like: four editors, six cases each with many metrics, a third of
    them failed with a long assertion message (one of them over several lines), and the sequential records."""
    from harness.metrics.registry import summarize
    from tests.test_report import _sequential, _single

    run = make_run()
    records = []
    for editor in ("rome", "memit", "alphaedit", "ft_constrained"):
        for i in range(6):
            failed = i % 3 == 1
            message = LONG_MESSAGE.format(case=f"b{i:02d}") if failed else None
            if failed and i == 4:
                message += "\nassert 0.0 >= 1.0\n +  where 0.0 = metrics['efficacy_success']"
            rec = _single(editor, f"b{i:02d}", f"subject number {i}", efficacy=0.0 if failed else 1.0,
                          outcome="failed" if failed else "passed", message=message)
            rec["metrics"].update({name: 0.123456 + k for k, name in enumerate(WIDE_METRICS)})
            records.append(rec)
        records.append(_sequential(editor, collapse_at=30 if editor == "rome" else None, growth=0.5))
    run["records"] = records
    run["config"]["editors"] = ["rome", "memit", "alphaedit", "ft_constrained"]
    run["summary"] = [g.to_json() for g in summarize(records)]
    return run


@pytest.fixture(scope="module", params=["make_run", "wide_run"])
def layout(request, tmp_path_factory):
    run = make_run() if request.param == "make_run" else wide_run()
    page = write_html(run, tmp_path_factory.mktemp("layout") / f"{request.param}.html")
    res = rr.render(page, page.with_suffix(".png"), probe=LAYOUT_PROBE)
    assert res.errors == []
    return request.param, res.probe


@needs_chromium
def test_a_failed_record_is_as_tall_as_its_message_needs(layout):
    """A failed row was ~150-550 px tall and blank beside its message, which sat in a narrow last column; now the
    message takes the row's width and the record is its row plus the lines of its message."""
    name, p = layout
    assert p["failed"], "no failed record found"
    for f in p["failed"]:
        msg, unit, row = f["msg"], f["unit"], f["row"]
        assert msg is not None, f
        visible = min(f["table"]["right"], f["scroller"]["right"]) - max(f["table"]["left"], f["scroller"]["left"])
        lines = round(f["textHeight"] / f["lineHeight"])
        if lines > 1:   # a message that wraps has most of the row's visible width to wrap in
            assert msg["width"] >= 0.5 * visible, f"{name}: the message is squeezed into {msg['width']:.0f} px: {f}"
        assert lines <= 3, f"{name}: a ~200-character message takes {lines} lines: {f}"
        # nothing blank: the record is its row (one text line + padding) and, under it, its message
        assert unit["height"] <= max(row["height"], 30) + (msg["height"] if unit is not row else 0) + 12, f
        assert unit["height"] <= 40 + lines * f["lineHeight"] + 12, f"{name}: {unit['height']:.0f} px for {lines} lines"
        if "\n" not in f["text"] and len(f["text"]) < 70:
            assert unit["height"] < 100, f"{name}: {unit['height']:.0f} px for a one-line message: {f}"


@needs_chromium
def test_nothing_is_cut_off_at_1280_px(layout):
    """The page never scrolls sideways; a table either fits its box or scrolls inside it (the box inside the
    viewport, marked so that its cut edge fades), and scrolled to its end it still shows the messages and the
    first column. The report of make_run() fits without any sideways scrolling."""
    name, p = layout
    assert p["vw"] == 1280 and p["scrollWidth"] <= 1280, f"{name}: the page is {p['scrollWidth']} px wide"
    assert p["beyond"] == [], f"{name}: cut off at the right edge: {p['beyond']}"
    for t in p["tables"]:
        if not t["fits"]:
            assert t["scroller"] is not None and t["scroller"]["right"] <= 1280, f"{name}: {t}"
            assert "more-right" in t["cls"], f"{name}: a wide table with no cue that it goes on: {t}"
    if name == "make_run":
        assert all(t["fits"] for t in p["tables"]), [t for t in p["tables"] if not t["fits"]]
    else:
        assert not all(t["fits"] for t in p["tables"])         # the wide run really needs the scrolling
        assert p["scrolled"], "no message or first column measured in a scrolled table"
        for el in p["scrolled"]:
            assert el["boxLeft"] - 0.5 <= el["left"] and el["left"] < el["boxRight"] - 100, f"{name}: {el}"


# ------------------------------------------------------------------ the committed leaderboard page (docs/leaderboard)
BOARD = Path(__file__).resolve().parents[1] / "docs" / "leaderboard"
BASELINE = Path(__file__).resolve().parents[1] / "baselines" / "cpu-gate.json"
BOARD_PROBE = r"""(() => ({
  vw: window.innerWidth, scrollWidth: document.documentElement.scrollWidth,
  tables: Array.from(document.querySelectorAll("table")).map((t) => ({
    title: (t.parentElement.previousElementSibling || {}).textContent || "",   // the <h2> above its scroll box
    editors: Array.from(t.querySelectorAll("tbody tr")).map((tr) => tr.cells[1] ? tr.cells[1].textContent : ""),
    ranks: Array.from(t.querySelectorAll("tbody tr")).map((tr) => tr.cells[0] ? tr.cells[0].textContent : ""),
  })),
}))()"""


@pytest.mark.skipif(not BASELINE.is_file(), reason="no baselines/cpu-gate.json")
def test_the_committed_leaderboard_is_the_baselines(tmp_path):
    """docs/leaderboard/ is what `harness leaderboard baselines/cpu-gate.json` writes (tox -e baselines): a
    baseline refreshed without its page, or a page edited by hand, fails here."""
    from harness.cli import main
    assert main(["leaderboard", str(BASELINE), "-o", str(tmp_path)]) == 0
    assert (tmp_path / "leaderboard.md").read_text() == (BOARD / "leaderboard.md").read_text()
    assert (tmp_path / "index.html").read_text() == (BOARD / "index.html").read_text()


@needs_chromium
@pytest.mark.skipif(not BASELINE.is_file(), reason="no baselines/cpu-gate.json")
def test_the_committed_leaderboard_opens_in_a_browser(tmp_path):
    """The page opens from disk with no console error and no request, every editor of the baseline is a row of
    both tables (single edits and sequential streams), every row is ranked, and nothing is cut off at 1280 px."""
    import json
    editors = set(json.loads(BASELINE.read_text())["config"]["editors"])
    res = rr.render(BOARD / "index.html", tmp_path / "board.png", probe=BOARD_PROBE)
    assert res.errors == [] and res.blocked == []
    p = res.probe
    assert p["vw"] == 1280 and p["scrollWidth"] <= 1280, p["scrollWidth"]
    boards = [t for t in p["tables"] if "/" in t["title"]]          # model / dataset / suite tables
    assert sorted(t["title"].rsplit("/ ", 1)[-1] for t in boards) == ["sequential", "single_edit"]
    for t in boards:
        assert {e.replace(" (collapsed)", "") for e in t["editors"]} == editors, t["title"]
        assert t["ranks"] == [str(i) for i in range(1, len(editors) + 1)], t["title"]
