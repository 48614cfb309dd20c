"""The HTML report in a real browser: headless Chromium (scripts/render_report.py) loads it from disk with no
network, logs no console errors, and screenshots it; its DOM has the tables and the inline SVG plots. The report
is built from the synthetic run of tests/test_report.py (two editors, failures, sequential curves, markup in
dataset text). Skipped where no Chromium is installed (Debian: ``apt-get install -y chromium``)."""
from __future__ import annotations

import importlib.util
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
    assert rendered.dom.count('class="filter"') == rendered.dom.count('class="sortable"') >= 5


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
