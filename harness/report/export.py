"""``harness export``: a run's results per (suite, editor) with 95% intervals, as lm-eval prints its tables.

* ``markdown`` and ``latex``: one table per suite, a row per editor (n, then each headline metric of the registry
  as ``value [low, high]``, or every aggregated metric with ``all_metrics``);
* ``csv``: long form, one row per (suite, editor, metric): value, ci_low, ci_high, n, aggregation, unit, label.

Every text cell is escaped for its format (``harness.report.escape``).
"""
from __future__ import annotations

import csv
import io
from collections.abc import Callable

from harness.metrics.registry import (
    REGISTRY,
    GroupSummary,
    headline_metrics,
    metric_spec,
)
from harness.report import fmt, fmt_aggregate, run_groups
from harness.report.escape import csv_text, latex_escape, markdown_cell

FORMATS = ("markdown", "latex", "csv")


def _columns(groups: list[GroupSummary], all_metrics: bool) -> list[str]:
    names = {n for g in groups for n in g.metrics}
    chosen = set(names) if all_metrics else set(headline_metrics(names)) | ({"timings.edit"} & names)
    return sorted(chosen, key=REGISTRY.order)


def _by_suite(groups: list[GroupSummary]) -> dict[str, list[GroupSummary]]:
    out: dict[str, list[GroupSummary]] = {}
    for g in groups:
        out.setdefault(g.suite, []).append(g)
    return out


def _rows(groups: list[GroupSummary], columns: list[str], escape: Callable[[str], str] = str) -> list[list[str]]:
    """Per editor: the (escaped) editor name, then numbers formatted here (no escaping needed)."""
    return [[escape(g.editor), str(g.n), f"{g.passed}/{g.n}", *[fmt_aggregate(g.metrics.get(c), None, 4) for c in columns]]
            for g in groups]


def to_markdown(groups: list[GroupSummary], all_metrics: bool = False) -> str:
    parts = []
    for suite, members in _by_suite(groups).items():
        columns = _columns(members, all_metrics)
        headers = ["editor", "n", "passed", *[metric_spec(c).display for c in columns]]
        parts += [f"### {markdown_cell(suite)}", "",
                  "| " + " | ".join(markdown_cell(h) for h in headers) + " |",
                  "|---|" + "---:|" * (len(headers) - 1)]
        parts += ["| " + " | ".join(row) + " |" for row in _rows(members, columns, markdown_cell)]
        parts.append("")
    parts.append("Cells: mean [95% bootstrap CI over cases]; timings: median; edits to collapse: the fewest over the "
                 "sequential streams (never: none collapsed).")
    return "\n".join(parts) + "\n"


def to_latex(groups: list[GroupSummary], all_metrics: bool = False) -> str:
    parts = []
    for suite, members in _by_suite(groups).items():
        columns = _columns(members, all_metrics)
        headers = ["editor", "n", "passed", *[metric_spec(c).display for c in columns]]
        parts += [r"\begin{table}[h]", r"\centering", r"\begin{tabular}{l" + "r" * (len(headers) - 1) + "}",
                  r"\hline", " & ".join(latex_escape(h) for h in headers) + r" \\", r"\hline"]
        parts += [" & ".join([row[0], *map(latex_escape, row[1:])]) + r" \\" for row in _rows(members, columns,
                                                                                                 latex_escape)]
        parts += [r"\hline", r"\end{tabular}",
                  r"\caption{" + latex_escape(f"{suite}: mean [95% bootstrap CI over cases]") + "}",
                  r"\end{table}", ""]
    return "\n".join(parts)


def to_text(groups: list[GroupSummary]) -> list[str]:
    """Plain-text lines for the terminal: per suite, a header and a row per editor with n, passed, each headline
    metric as ``mean [95% CI]`` and the median edit time; columns padded to their widest cell."""
    lines = []
    for suite, members in _by_suite(groups).items():
        columns = _columns(members, False)
        table = [[suite, "n", "passed", *[metric_spec(c).display for c in columns]], *_rows(members, columns)]
        widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
        lines += [" ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
                  for r in table]
    return lines


def to_csv(groups: list[GroupSummary]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)        # RFC 4180 rows ending in CR LF: a field holding CR or LF is quoted
    writer.writerow(["suite", "editor", "metric", "label", "value", "ci_low", "ci_high", "n", "aggregation", "unit"])
    for g in groups:
        for name, agg in g.metrics.items():
            spec = metric_spec(name)
            writer.writerow([csv_text(g.suite), csv_text(g.editor), csv_text(name), csv_text(spec.display),
                             *[fmt(v, 6) if v is not None else "" for v in (agg.value, agg.low, agg.high)],
                             agg.n, agg.aggregation, csv_text(spec.unit)])
    return buf.getvalue()


EXPORTERS: dict[str, Callable[[list[GroupSummary], bool], str]] = {
    "markdown": to_markdown, "latex": to_latex, "csv": lambda groups, _all: to_csv(groups)}


def export_table(run: dict, format: str, all_metrics: bool = False) -> str:
    """The run's per (suite, editor) aggregates in ``format`` (one of :data:`FORMATS`)."""
    if format not in EXPORTERS:
        raise ValueError(f"unknown export format {format!r}; use one of {', '.join(FORMATS)}")
    return EXPORTERS[format](run_groups(run), all_metrics)
