"""Compare a run against a baseline run, per (suite, editor), and flag regressions.

Tolerances (``compare(..., tolerances=...)``; keys not given keep their default):

* ``score`` (0.05, absolute): higher-is-better scores (efficacy/paraphrase/neighborhood success,
  ``*_magnitude``, token accuracies, ``downstream_*_after``, efficacy_final/immediate, pass_rate)
  regress when they drop by more than this.
* ``collapse`` (0.10, relative): ``edits_to_collapse`` (a count; the minimum over records, with
  "never collapsed" as infinity) regresses when it drops by more than this fraction.
* ``ppl`` (0.10, relative): lower-is-better metrics (ppl_ratio, ppl_after, kl_*, top1_changed)
  regress when they rise by more than this fraction.
* ``time`` (0.5, relative, ``None`` disables): mean ``timings.<phase>`` regress when slower by more
  than this fraction *and* by more than ``time_floor_s`` (0.05 s) so millisecond noise is ignored.
* Any metric name (e.g. ``"efficacy_success": 0.02``) overrides its category's tolerance; ``None``
  skips that metric.

A (suite, editor) present in the baseline but absent from the run is reported as ``missing`` and
counts as a regression. Metrics not present in both are not compared.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from harness.report import (
    as_number,
    editor_of,
    fmt,
    is_skipped,
    mean,
    metric,
    model_name,
    ordered_phases,
    suite_of,
    timings,
)

DEFAULT_TOLERANCES: dict[str, float | None] = {
    "score": 0.05,
    "collapse": 0.10,
    "ppl": 0.10,
    "time": 0.50,
    "time_floor_s": 0.05,
}
# category -> (higher_is_better, relative tolerance?)
_RULES = {"score": (True, False), "collapse": (True, True), "ppl": (False, True), "time": (False, True)}
_HIGHER = {"efficacy_success", "paraphrase_success", "neighborhood_success", "efficacy_final",
           "efficacy_immediate", "pass_rate"}
_LOWER = {"ppl_ratio", "ppl_after", "kl_unrelated", "top1_changed"}
_EPS = 1e-9
# Rows list these first (in this order), then the other metrics alphabetically.
_FIRST = ("efficacy_success", "paraphrase_success", "neighborhood_success", "efficacy_immediate",
          "efficacy_final", "edits_to_collapse", "ppl_ratio", "ppl_after")
STATUSES = ("ok", "regressed", "improved", "missing")


def metric_category(name: str) -> str | None:
    """The tolerance category of a metric name, or None when it is not compared."""
    if name == "edits_to_collapse":
        return "collapse"
    if name.startswith("downstream_") and name.endswith("_after"):
        return "ppl" if ("ppl" in name or "perplexity" in name) else "score"
    if (name in _HIGHER or name.endswith("_magnitude") or "token_acc" in name
            or name.endswith("_acc") or name.endswith("_accuracy")):
        return "score"
    if name in _LOWER or name.startswith("kl_"):
        return "ppl"
    return None


@dataclass
class CompareRow:
    """One compared value. ``change`` is current - baseline for absolute tolerances and the
    relative change (current / baseline - 1) for relative ones (``relative`` tells which)."""

    suite: str
    editor: str
    metric: str
    baseline: float | None
    current: float | None
    change: float | None
    tolerance: float | None
    status: str
    relative: bool = False


@dataclass
class CompareResult:
    """All compared rows plus notes (e.g. different models); ``ok`` is False on any regression."""

    rows: list[CompareRow]
    notes: list[str] = field(default_factory=list)

    @property
    def regressions(self) -> list[CompareRow]:
        return [r for r in self.rows if r.status in ("regressed", "missing")]

    @property
    def improvements(self) -> list[CompareRow]:
        return [r for r in self.rows if r.status == "improved"]

    @property
    def ok(self) -> bool:
        return not self.regressions

    def summary(self) -> str:
        """One line: verdict and counts."""
        verdict = "OK" if self.ok else "REGRESSION"
        return (f"{verdict}: {len(self.regressions)} regression(s), {len(self.improvements)} "
                f"improvement(s), {len(self.rows)} comparison(s)")

    def to_markdown(self, only_changes: bool = False) -> str:
        """Markdown table of the rows (all, or only non-ok ones), followed by notes and the summary."""
        header = ["suite", "editor", "metric", "baseline", "current", "change", "tolerance", "status"]
        lines = ["| " + " | ".join(header) + " |", "|---|---|---|---:|---:|---:|---:|---|"]
        for row in self.rows:
            if only_changes and row.status == "ok":
                continue
            status = row.status if row.status in ("ok", "improved") else f"**{row.status.upper()}**"
            cells = [row.suite, row.editor, row.metric, fmt(row.baseline), fmt(row.current),
                     _fmt_change(row), _fmt_tolerance(row), status]
            lines.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
        lines.append("")
        lines.extend(f"Note: {note}" for note in self.notes)
        lines.append(self.summary())
        return "\n".join(lines) + "\n"


def compare(baseline: dict, run: dict, tolerances: dict | None = None) -> CompareResult:
    """Compare the per-(suite, editor) means of ``run`` against ``baseline``."""
    tol = {**DEFAULT_TOLERANCES, **(tolerances or {})}
    base_groups, cur_groups = group_stats(baseline), group_stats(run)
    notes = []
    if model_name(baseline) != model_name(run):
        notes.append(f"baseline model {model_name(baseline)!r} differs from run model {model_name(run)!r}")

    rows: list[CompareRow] = []
    for (suite, editor), base_stats in base_groups.items():
        cur_stats = cur_groups.get((suite, editor))
        if cur_stats is None:
            rows.append(CompareRow(suite, editor, "*", None, None, None, None, "missing"))
            continue
        for name, base_value in base_stats.items():
            if name not in cur_stats:
                continue
            category = "time" if name.startswith("timings.") else metric_category(name)
            tolerance = tol.get(name, tol.get(category))
            if tolerance is None:
                continue
            rows.append(_compare_value(suite, editor, name, base_value, cur_stats[name], category,
                                       float(tolerance), tol.get("time_floor_s") or 0.0))
    return CompareResult(rows, notes)


def group_stats(run: dict) -> dict[tuple[str, str], dict[str, float]]:
    """Per (suite, editor): pass_rate, mean of each compared metric, min edits_to_collapse and mean
    seconds per timing phase (as ``timings.<phase>``), over the non-skipped records."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for rec in run.get("records") or []:
        if isinstance(rec, dict) and not is_skipped(rec):
            groups[(suite_of(rec), editor_of(rec))].append(rec)

    stats: dict[tuple[str, str], dict[str, float]] = {}
    for key, recs in groups.items():
        values: dict[str, float] = {"pass_rate": sum(r.get("outcome") == "passed" for r in recs) / len(recs)}
        names = {n for r in recs for n in (r.get("metrics") or {}) if metric_category(n)}
        names = [n for n in _FIRST if n in names] + sorted(names - set(_FIRST))
        for name in names:
            if name == "edits_to_collapse":
                present = [r for r in recs if "edits_to_collapse" in (r.get("metrics") or {})]
                collapse = [as_number(metric(r, name)) for r in present]
                values[name] = min(math.inf if c is None else c for c in collapse)
            elif (m := mean(metric(r, name) for r in recs)) is not None:
                values[name] = m
        for phase in ordered_phases(p for r in recs for p in timings(r)):
            if (m := mean(timings(r).get(phase) for r in recs)) is not None:
                values[f"timings.{phase}"] = m
        stats[key] = values
    return stats


def _compare_value(suite: str, editor: str, name: str, base: float, cur: float, category: str,
                   tolerance: float, time_floor: float) -> CompareRow:
    higher_is_better, relative = _RULES[category]
    if relative:
        change = _relative_change(base, cur)
    else:
        change = 0.0 if base == cur else cur - base
    gain = change if higher_is_better else -change  # > 0 means better
    if math.isnan(gain):
        status = "ok"
    elif gain < -(tolerance + _EPS):
        status = "regressed"
    elif gain > tolerance + _EPS:
        status = "improved"
    else:
        status = "ok"
    if category == "time" and status != "ok" and abs(cur - base) <= time_floor:
        status = "ok"
    return CompareRow(suite, editor, name, base, cur, change, tolerance, status, relative)


def _relative_change(base: float, cur: float) -> float:
    if base == cur:
        return 0.0
    if math.isinf(base) or math.isinf(cur) or base == 0:
        return math.copysign(math.inf, cur - base)
    return (cur - base) / abs(base)


def _fmt_change(row: CompareRow) -> str:
    if row.change is None:
        return "-"
    if row.relative:
        return f"{row.change:+.1%}" if math.isfinite(row.change) else fmt(row.change)
    return f"{row.change:+.4g}"


def _fmt_tolerance(row: CompareRow) -> str:
    if row.tolerance is None:
        return "-"
    return f"{row.tolerance * 100:g}%" if row.relative else f"{row.tolerance:g}"


def _md_cell(text: Any) -> str:
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")
