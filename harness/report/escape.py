"""Escaping for every text output the reports write, so that no string from a run (model, editor, run id, case
text, messages) can become markup: markdown (every ASCII punctuation character backslash-escaped, which CommonMark
renders as itself and never as HTML, a link or emphasis), LaTeX (the ten specials and the characters OT1 fonts
misprint) and CSV (the csv module's quoting, and a leading quote before text that a spreadsheet would run as a
formula). HTML is escaped by Jinja2's autoescaping (``harness.report.template_env``)."""
from __future__ import annotations

import re
import string
from typing import Any

_MD_SPECIAL = re.compile("([" + re.escape(string.punctuation) + "])")
_LINE_BREAKS = re.compile(r"[\r\n\u2028\u2029\x0b\x0c\x85]+")

LATEX_ESCAPES = {
    "\\": r"\textbackslash{}", "{": r"\{", "}": r"\}", "$": r"\$", "&": r"\&", "#": r"\#", "^": r"\textasciicircum{}",
    "_": r"\_", "%": r"\%", "~": r"\textasciitilde{}", "<": r"\textless{}", ">": r"\textgreater{}", "|": r"\textbar{}",
}
_LATEX_SPECIAL = re.compile("|".join(re.escape(c) for c in LATEX_ESCAPES))
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def markdown_cell(value: Any) -> str:
    """Text for a markdown table cell: one line, every ASCII punctuation character backslash-escaped."""
    return _MD_SPECIAL.sub(r"\\\1", _LINE_BREAKS.sub(" ", str(value)))


def latex_escape(value: Any) -> str:
    """Text for a LaTeX table cell: one line, specials replaced by their text commands."""
    return _LATEX_SPECIAL.sub(lambda m: LATEX_ESCAPES[m.group(0)], _LINE_BREAKS.sub(" ", str(value)))


def csv_text(value: Any) -> str:
    """A text (not numeric) CSV field: prefixed with ' when a spreadsheet would read it as a formula."""
    text = str(value)
    return "'" + text if text.startswith(_FORMULA_START) else text
