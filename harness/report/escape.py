"""Escaping for every text output the reports write, so that no string from a run (model, editor, run id, case
text, messages) can become markup: markdown (a backslash before every character that can open HTML, an entity, a
link, an image, code, emphasis, strikethrough, math, a table cell or a GFM autolink; CommonMark renders an escaped
character as itself), LaTeX (the ten specials and the characters OT1 fonts
misprint) and CSV (the csv module's quoting, and a leading quote before text that a spreadsheet would run as a
formula). HTML is escaped by Jinja2's autoescaping (``harness.report.template_env``)."""
from __future__ import annotations

import re
from typing import Any

# always: \ ` * [ ] < > & | ~ $ @ ; "_" unless between two letters/digits (intraword "_" never opens emphasis);
# ":" before "/" (scheme autolinks) and "." after "www" (GFM www autolinks)
_MD_ALWAYS = set("\\`*[]<>&|~$@")
_LINE_BREAKS = re.compile(r"[\r\n\u2028\u2029\x0b\x0c\x85]+")

LATEX_ESCAPES = {
    "\\": r"\textbackslash{}", "{": r"\{", "}": r"\}", "$": r"\$", "&": r"\&", "#": r"\#", "^": r"\textasciicircum{}",
    "_": r"\_", "%": r"\%", "~": r"\textasciitilde{}", "<": r"\textless{}", ">": r"\textgreater{}", "|": r"\textbar{}",
}
_LATEX_SPECIAL = re.compile("|".join(re.escape(c) for c in LATEX_ESCAPES))
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _md_escaped(text: str, i: int) -> bool:
    ch = text[i]
    if ch in _MD_ALWAYS:
        return True
    before, after = text[i - 1] if i > 0 else " ", text[i + 1] if i + 1 < len(text) else " "
    if ch == "_":
        return not (before.isalnum() and after.isalnum())
    if ch == ":":
        return after == "/"
    if ch == ".":
        return text[max(0, i - 3):i].lower() == "www"
    return False


def markdown_cell(value: Any) -> str:
    """Run-provided text for markdown (a table cell, a heading, a list item): one line, markup escaped."""
    text = _LINE_BREAKS.sub(" ", str(value))
    return "".join("\\" + ch if _md_escaped(text, i) else ch for i, ch in enumerate(text))


def latex_escape(value: Any) -> str:
    """Text for a LaTeX table cell: one line, specials replaced by their text commands."""
    return _LATEX_SPECIAL.sub(lambda m: LATEX_ESCAPES[m.group(0)], _LINE_BREAKS.sub(" ", str(value)))


def csv_text(value: Any) -> str:
    """A text (not numeric) CSV field: prefixed with ' when a spreadsheet would read it as a formula."""
    text = str(value)
    return "'" + text if text.startswith(_FORMULA_START) else text
