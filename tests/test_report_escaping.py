"""No string from a run can break out of any output format: a hypothesis property over arbitrary text for HTML
(run report and leaderboard page), markdown (leaderboard, compare, export), LaTeX and CSV. Each output is parsed
back by a real parser (html.parser, markdown-it with raw HTML enabled, csv) and must hold exactly the markup the
harness wrote, with the text intact."""
from __future__ import annotations

import copy
import csv
import io
import re
from collections import Counter
from html.parser import HTMLParser

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from markdown_it import MarkdownIt

from harness.report import run_groups
from harness.report.escape import LATEX_ESCAPES, csv_text, latex_escape, markdown_cell
from harness.report.export import to_csv, to_latex
from harness.report.html import render_html
from harness.report.leaderboard import board_tables, to_markdown, write_leaderboard
from tests.test_report import make_run

PAYLOADS = ["</script><script>alert(1)</script>", '<img src=x onerror="alert(1)">', "[click](javascript:alert(1))",
            "![x](http://evil/x.png)", "<b>bold</b> & &amp; &#60;", "| a | b |", "`code` *em* _u_ ~~s~~",
            "\\textbf{x} $x^2$ 50% #1 a_b {c} ~", "=HYPERLINK(\"http://evil\")", "line\nbreak\r\nand\u2028more",
            "www.evil.com http://evil.com a@b.co", "<!-- c -->", "<![CDATA[x]]>", "\\<img src=x\\>"]
TEXT = st.one_of(st.sampled_from(PAYLOADS), st.text(max_size=40),
                 st.text(alphabet=st.sampled_from(list("<>&\"'`*_[]()!|\\/:.#$%^{}~=@-+ \nabc1")), max_size=30))
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class Tags(HTMLParser):
    """Start tags, attribute names and text of an HTML document."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: Counter[str] = Counter()
        self.attrs: set[str] = set()
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags[tag] += 1
        self.attrs.update(name for name, _ in attrs)

    def handle_data(self, data):
        self.text.append(data)

    def handle_comment(self, data):
        self.tags["<!--"] += 1


def parse(html: str) -> Tags:
    p = Tags()
    p.feed(html)
    p.close()
    return p


def _norm(text: str) -> str:
    return " ".join(text.replace("\0", "\ufffd").split())


MD = MarkdownIt("commonmark", {"html": True}).enable("table").enable("strikethrough")


@FAST
@given(TEXT)
def test_markdown_cell_is_text_in_a_table_cell(text):
    html = MD.render("| h |\n|---|\n| " + markdown_cell(text) + " |\n")
    parsed = parse(html)
    assert set(parsed.tags) <= {"table", "thead", "tbody", "tr", "th", "td"}, html
    cell = re.search(r"<td>(.*?)</td>", html, re.S)
    assert _norm("".join(parse(cell.group(1)).text) if cell else "") == _norm(text)
    heading = parse(MD.render("## " + markdown_cell(text)))
    assert set(heading.tags) <= {"h2"}


@SLOW
@given(TEXT)
def test_leaderboard_markdown_and_page_keep_run_fields_as_text(tmp_path_factory, text):
    run = make_run(model=text, run_id=text)
    for rec in run["records"]:
        if rec["editor"] == "memit":
            rec["editor"] = text or "-"
    tables = board_tables([run], min_n=1)
    parsed = parse(MD.render(to_markdown(tables, 1)))
    assert set(parsed.tags) <= {"p", "h2", "table", "thead", "tbody", "tr", "th", "td"}
    md_path, html_path = write_leaderboard([run], tmp_path_factory.mktemp("lb"), min_n=1)
    assert set(parse(MD.render(md_path.read_text(encoding="utf-8"))).tags) <= {
        "h1", "p", "h2", "table", "thead", "tbody", "tr", "th", "td", "ul", "li"}
    page = parse(html_path.read_text(encoding="utf-8"))
    benign = parse(write_leaderboard([make_run()], tmp_path_factory.mktemp("lb"), min_n=1)[1].read_text())
    assert set(page.tags) == set(benign.tags) and "script" not in page.tags
    assert not any(a.startswith("on") for a in page.attrs)


@SLOW
@given(TEXT)
def test_run_report_keeps_dataset_and_run_fields_as_text(text):
    run = make_run(model=text, run_id=text)
    for rec in run["records"]:
        rec["subject"] = text
        rec["message"] = text
        if rec["editor"] == "memit":
            rec["editor"] = text or "-"
    run["provenance"]["dataset"]["path"] = text
    run["provenance"]["editors"]["rome"]["hparams"]["note"] = text
    page = parse(render_html(run, plots=False))
    benign = parse(render_html(make_run(), plots=False))
    assert set(page.tags) <= set(benign.tags) | {"details", "summary"}
    assert page.tags["script"] == 1 and page.tags["<!--"] == 0
    assert not any(a.startswith("on") for a in page.attrs)


_LATEX_CMD = re.compile("|".join(re.escape(v) for v in sorted(LATEX_ESCAPES.values(), key=len, reverse=True)))


@FAST
@given(TEXT)
def test_latex_escape_leaves_no_special_and_round_trips(text):
    escaped = latex_escape(text)
    bare = _LATEX_CMD.sub("", escaped)
    assert not set(bare) & set("\\{}$&#^_%~<>|\n\r")
    inverse = {v: k for k, v in LATEX_ESCAPES.items()}
    assert _LATEX_CMD.sub(lambda m: inverse[m.group(0)], escaped) == re.sub(r"[\r\n\u2028\u2029\x0b\x0c\x85]+", " ", text)


@FAST
@given(TEXT)
def test_exported_latex_rows_have_exactly_their_columns(text):
    run = copy.deepcopy(make_run())
    for rec in run["records"]:
        rec["editor"] = text or "-"
    for line in to_latex(run_groups(run)).splitlines():
        if line.endswith(r"\\"):
            assert len(re.findall(r"(?<!\\)&", line)) == 7, line        # 8 columns, 7 separators


@FAST
@given(TEXT, TEXT)
def test_csv_round_trips_and_guards_formulas(editor, suite):
    run = copy.deepcopy(make_run())
    for rec in run["records"]:
        rec["editor"], rec["suite"] = editor or "-", suite or "-"
    rows = list(csv.reader(io.StringIO(to_csv(run_groups(run)), newline="")))
    assert rows[0][:3] == ["suite", "editor", "metric"] and all(len(r) == 10 for r in rows)
    assert {r[0] for r in rows[1:]} == {csv_text(suite or "-")} and {r[1] for r in rows[1:]} == {csv_text(editor or "-")}
    assert not any(r[1].startswith(("=", "+", "-", "@")) and not r[1].startswith("'") for r in rows[1:]
                   if r[1] != "-")
