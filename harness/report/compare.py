"""Compare a run against a baseline run, case by case, and flag only regressions a CI can trust.

1. **Like for like or refuse.** The two runs must share the model (name and weight fingerprint), the dataset
   (resolved spec and the file's sha256), the perplexity corpus (spec, texts asked for, the file's sha256) and the
   thresholds; otherwise :func:`compare` returns a refusal (one line,
   ``harness compare`` exits 2) unless ``allow_different=True`` (``--allow-different``), which turns it into notes.
   A different key-statistics corpus is a note, not a refusal: it is part of the editors' setting under test.
2. **Paired.** Records are matched by (suite, editor, case id, test id); each metric is compared over the cases
   both runs have, as the metric registry aggregates it (mean for scores, median for phase timings).
3. **Beyond tolerance and significant.** A metric regresses when the paired change of its aggregate (current -
   baseline, or current / baseline - 1 for relative metrics) is worse than its tolerance *and* the 95% paired
   bootstrap interval of that change lies entirely on the worse side of zero. Beyond tolerance but not
   significant is reported as ``not significant`` and does not fail. ``edits_to_collapse`` (one count per
   sequential stream; a missing value means never collapsed) regresses when its minimum drops by more than its
   tolerance. A metric with no direction in the registry (or not registered) is never compared; it is listed.
4. **Nothing silently dropped.** A (suite, editor) of the baseline absent from the run is ``missing``; a metric
   that is a number in the baseline and not in the run (null, NaN, text) is ``not a number``; both count as
   regressions.

Tolerances (``compare(..., tolerances=...)``; keys not given keep their default): ``score`` (0.05, absolute) for
metrics compared as differences; ``ppl`` (0.10, relative) for relative ones (perplexities, ratios, KL);
``collapse`` (0.10, relative) for edits_to_collapse; ``time`` (0.5, relative, ``None`` disables) for phase-timing
medians, which must also move by more than ``time_floor_s`` (0.05 s). A metric's own name overrides its
category's tolerance; ``None`` skips it.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

from harness.metrics.registry import (
    FAILED_OUTCOMES,
    MetricSpec,
    aggregate,
    metric_spec,
    paired_bootstrap,
    record_names,
    record_value,
    to_number,
)
from harness.provenance import corpus_setting, run_corpora
from harness.report import (
    dataset_of,
    editor_of,
    fmt,
    model_name,
    suite_of,
    thresholds_of,
)

DEFAULT_TOLERANCES: dict[str, float | None] = {
    "score": 0.05,
    "collapse": 0.10,
    "ppl": 0.10,
    "time": 0.50,
    "time_floor_s": 0.05,
}
_EPS = 1e-9
REGRESSION_STATUSES = ("regressed", "missing", "not a number")
STATUSES = ("ok", "regressed", "improved", "not significant", "missing", "not a number", "baseline not a number",
            "fewer passed")   # "fewer passed" (pass_rate) is informative: the metrics that failed carry the verdict

CaseKey = tuple[str, str, str, str]


@dataclass
class CompareRow:
    """One compared metric of one (suite, editor): the aggregates of both runs over the shared cases, the change
    (absolute, or relative when ``relative``) with its 95% paired-bootstrap interval, and the verdict."""

    suite: str
    editor: str
    metric: str
    baseline: float | None
    current: float | None
    change: float | None
    tolerance: float | None
    status: str
    relative: bool = False
    low: float | None = None
    high: float | None = None
    n: int = 0


@dataclass
class CompareResult:
    """All compared rows plus notes; ``refused`` is the one-line reason when the runs are not comparable."""

    rows: list[CompareRow]
    notes: list[str] = field(default_factory=list)
    refused: str | None = None
    not_compared: list[str] = field(default_factory=list)

    @property
    def regressions(self) -> list[CompareRow]:
        return [r for r in self.rows if r.status in REGRESSION_STATUSES]

    @property
    def improvements(self) -> list[CompareRow]:
        return [r for r in self.rows if r.status == "improved"]

    @property
    def ok(self) -> bool:
        return self.refused is None and not self.regressions

    def summary(self) -> str:
        """One line: verdict and counts."""
        if self.refused:
            return f"REFUSED: {self.refused}"
        verdict = "OK" if self.ok else "REGRESSION"
        unsure = sum(r.status == "not significant" for r in self.rows)
        return (f"{verdict}: {len(self.regressions)} regression(s), {len(self.improvements)} improvement(s), "
                f"{unsure} change(s) beyond tolerance but not significant, {len(self.rows)} comparison(s)")

    def to_markdown(self, only_changes: bool = False) -> str:
        """Markdown table of the rows (all, or only non-ok ones), followed by notes and the summary."""
        from harness.report.escape import markdown_cell

        header = ["suite", "editor", "metric", "n", "baseline", "current", "change [95% CI]", "tolerance", "status"]
        lines = ["| " + " | ".join(header) + " |", "|---|---|---|---:|---:|---:|---:|---:|---|"]
        for row in self.rows:
            if only_changes and row.status == "ok":
                continue
            status = f"**{row.status.upper()}**" if row.status in REGRESSION_STATUSES else row.status
            cells = [*map(markdown_cell, (row.suite, row.editor, row.metric)), str(row.n), fmt(row.baseline),
                     fmt(row.current), _fmt_change(row), _fmt_tolerance(row), status]    # numbers: ours, plain
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        if self.not_compared:
            lines.append("Not compared (no direction in the metric registry): "
                         + markdown_cell(", ".join(self.not_compared)))
        lines.extend(f"Note: {markdown_cell(note)}" for note in self.notes)
        lines.append(self.summary())
        return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- like for like
def differences(baseline: dict, run: dict) -> list[str]:
    """Why the two runs are not like for like (model, dataset, thresholds); [] when they are."""
    out = []
    bm, rm = baseline.get("model") or {}, run.get("model") or {}
    if model_name(baseline) != model_name(run):
        out.append(f"model differs ({model_name(baseline)!r} vs {model_name(run)!r})")
    elif isinstance(bm, dict) and isinstance(rm, dict) and bm.get("fingerprint") and rm.get("fingerprint") \
            and bm["fingerprint"] != rm["fingerprint"]:
        out.append(f"model weights differ (fingerprint {bm['fingerprint']} vs {rm['fingerprint']})")
    bd, rd = dataset_of(baseline), dataset_of(run)
    b_names = {str(bd.get(k)) for k in ("spec", "requested") if bd.get(k)}
    r_names = {str(rd.get(k)) for k in ("spec", "requested") if rd.get(k)}
    if b_names and r_names and not b_names & r_names:
        out.append(f"dataset differs ({bd.get('spec')!r} vs {rd.get('spec')!r})")
    elif bd.get("sha256") and rd.get("sha256") and bd["sha256"] != rd["sha256"]:
        out.append(f"dataset file differs (sha256 {bd['sha256'][:12]} vs {rd['sha256'][:12]})")
    b_ppl, r_ppl = (corpus_setting(run_corpora(r).get("perplexity")) for r in (baseline, run))
    if b_ppl and r_ppl and b_ppl != r_ppl:       # perplexities of different texts: their ratios do not compare
        out.append(f"perplexity corpus differs ({_describe(b_ppl)} vs {_describe(r_ppl)})")
    bt, rt = thresholds_of(baseline), thresholds_of(run)
    changed = sorted(k for k in set(bt) | set(rt) if bt.get(k) != rt.get(k) and k in bt and k in rt)
    if changed:
        out.append("thresholds differ (" + ", ".join(f"{k} {bt[k]} vs {rt[k]}" for k in changed) + ")")
    return out


# --------------------------------------------------------------------------- matching and comparing
def case_key(record: dict) -> CaseKey:
    """(suite, editor, case id, test id): the test id (function name and parameters, no file path) tells apart
    the records of one case in several tests, e.g. the five editing problems."""
    nodeid = str(record.get("nodeid") or "")
    return suite_of(record), editor_of(record), str(record.get("case_id")), nodeid.split("::")[-1]


def _by_case(run: dict) -> dict[tuple[str, str], dict[CaseKey, dict]]:
    groups: dict[tuple[str, str], dict[CaseKey, dict]] = defaultdict(dict)
    for rec in run.get("records") or []:
        if isinstance(rec, dict) and rec.get("outcome") != "skipped":
            groups[(suite_of(rec), editor_of(rec))][case_key(rec)] = rec
    return groups


def _describe(setting: dict) -> str:
    return ", ".join(f"{k} {str(v)[:12] if k == 'sha256' else v}" for k, v in setting.items())


def setting_notes(baseline: dict, run: dict) -> list[str]:
    """Differences that are part of what is being compared (the editors' setting), said but not refused: the key
    statistics corpus changes the editors' updates, as a hyper-parameter does."""
    b, r = (corpus_setting(run_corpora(x).get("statistics")) for x in (baseline, run))
    if b and r and b != r:
        return [f"key statistics corpus differs ({_describe(b)} vs {_describe(r)}): "
                "the editors' updates differ by construction"]
    return []


def compare(baseline: dict, run: dict, tolerances: dict | None = None, *, allow_different: bool = False
            ) -> CompareResult:
    """Compare ``run`` against ``baseline`` case by case (module docstring)."""
    tol = {**DEFAULT_TOLERANCES, **(tolerances or {})}
    diffs = differences(baseline, run)
    if diffs and not allow_different:
        return CompareResult([], refused="; ".join(diffs) + " (pass --allow-different to compare anyway)")
    result = CompareResult([], notes=[f"{d} (compared anyway: --allow-different)" for d in diffs]
                           + setting_notes(baseline, run))
    base_groups, cur_groups = _by_case(baseline), _by_case(run)
    not_compared: set[str] = set()
    for (suite, editor), base_cases in base_groups.items():
        cur_cases = cur_groups.get((suite, editor), {})
        shared = [k for k in base_cases if k in cur_cases]
        if not shared:
            result.rows.append(CompareRow(suite, editor, "*", None, None, None, None, "missing"))
            continue
        if len(shared) < len(base_cases):
            result.notes.append(f"{suite}/{editor}: {len(base_cases) - len(shared)} of {len(base_cases)} baseline "
                                "cases are not in the run; compared on the shared ones")
        pairs = [(base_cases[k], cur_cases[k]) for k in shared]
        result.rows.append(_pass_rate_row(suite, editor, pairs))
        for name in record_names(base_cases[k] for k in shared):
            spec = metric_spec(name)
            if spec.aggregation == "none":
                continue
            if spec.higher_is_better is None:
                not_compared.add(name)
                continue
            tolerance = tol.get(name, tol.get(_category(spec)))
            if tolerance is not None:
                row = _compare_metric(suite, editor, spec, pairs, float(tolerance), float(tol.get("time_floor_s") or 0))
                if row is not None:
                    result.rows.append(row)
    new = sorted(set(cur_groups) - set(base_groups))
    if new:
        result.notes.append("in the run only (not compared): " + ", ".join(f"{s}/{e}" for s, e in new))
    result.not_compared = sorted(not_compared)
    return result


def _category(spec: MetricSpec) -> str:
    if spec.name.startswith("timings."):
        return "time"
    if spec.aggregation == "min":
        return "collapse"
    return "ppl" if spec.relative else "score"


def _pass_rate_row(suite: str, editor: str, pairs: list[tuple[dict, dict]]) -> CompareRow:
    """Passed tests among the shared cases: informative (the metrics carry the verdict)."""
    b = sum(r.get("outcome") == "passed" for r, _ in pairs) / len(pairs)
    c = sum(r.get("outcome") == "passed" for _, r in pairs) / len(pairs)
    newly_failed = sum(br.get("outcome") == "passed" and cr.get("outcome") in FAILED_OUTCOMES for br, cr in pairs)
    status = "ok" if newly_failed == 0 else "fewer passed"
    return CompareRow(suite, editor, "pass_rate", b, c, c - b, None, status, n=len(pairs))


def _compare_metric(suite: str, editor: str, spec: MetricSpec, pairs: list[tuple[dict, dict]], tolerance: float,
                    time_floor: float) -> CompareRow | None:
    name = spec.name
    present = [(b, c) for b, c in pairs if _has(b, name)]
    if not present:
        return None
    row = CompareRow(suite, editor, name, None, None, None, tolerance, "ok", spec.relative, n=len(present))
    if spec.aggregation == "min":
        return _compare_min(row, spec, present)
    base = [to_number(record_value(b, name)) for b, _ in present]
    cur = [to_number(record_value(c, name)) for _, c in present]
    if any(c is None for b, c in zip(base, cur) if b is not None):
        row.status = "not a number"
        row.n = sum(c is None for b, c in zip(base, cur) if b is not None)   # cases whose value was lost
        return row
    both = [(b, c) for b, c in zip(base, cur) if b is not None]
    if not both:
        row.status = "baseline not a number"
        return row
    bs, cs = [b for b, _ in both], [c for _, c in both]
    row.baseline = aggregate(bs, spec.aggregation).value
    row.current = aggregate(cs, spec.aggregation).value
    diff = paired_bootstrap(bs, cs, spec.aggregation, relative=spec.relative)
    row.change, row.low, row.high, row.n = diff.change, diff.low, diff.high, diff.n
    row.status = _verdict(spec, diff.change, diff.low, diff.high, tolerance)
    if name.startswith("timings.") and row.status != "ok" and abs(row.current - row.baseline) <= time_floor:
        row.status = "ok"
    return row


def _has(record: dict, name: str) -> bool:
    if name.startswith("timings."):
        return record_value(record, name) is not None
    return name in (record.get("metrics") or {})


def _verdict(spec: MetricSpec, change: float, low: float, high: float, tolerance: float) -> str:
    """Regressed / improved only when beyond tolerance and the interval excludes zero on that side."""
    sign = 1.0 if spec.higher_is_better else -1.0
    gain, gain_low, gain_high = sign * change, min(sign * low, sign * high), max(sign * low, sign * high)
    if math.isnan(gain):
        return "not a number"
    if gain < -(tolerance + _EPS):
        return "regressed" if gain_high < 0 else "not significant"
    if gain > tolerance + _EPS:
        return "improved" if gain_low > 0 else "not significant"
    return "ok"


def _compare_min(row: CompareRow, spec: MetricSpec, present: list[tuple[dict, dict]]) -> CompareRow:
    """edits_to_collapse: the minimum over streams (missing = never, +inf); no interval (one count per stream)."""
    row.baseline = aggregate([record_value(b, spec.name) for b, _ in present], "min").value
    row.current = aggregate([record_value(c, spec.name) for _, c in present], "min").value
    if row.baseline is None or row.current is None:
        row.status = "not a number" if row.current is None else "baseline not a number"
        return row
    row.change = _relative_change(row.baseline, row.current)
    row.status = _verdict(spec, row.change, row.change, row.change, row.tolerance or 0.0)
    return row


def _relative_change(base: float, cur: float) -> float:
    if base == cur:
        return 0.0
    if math.isinf(base) or math.isinf(cur) or base == 0:
        return math.copysign(math.inf, cur - base)
    return (cur - base) / abs(base)


def _fmt_change(row: CompareRow) -> str:
    if row.change is None:
        return "-"

    def one(v: float) -> str:
        if not math.isfinite(v):
            return fmt(v)
        return f"{v:+.1%}" if row.relative else f"{v:+.4g}"

    interval = f" [{one(row.low)}, {one(row.high)}]" if row.low is not None and row.high is not None else ""
    return one(row.change) + interval


def _fmt_tolerance(row: CompareRow) -> str:
    if row.tolerance is None:
        return "-"
    return f"{row.tolerance * 100:g}%" if row.relative else f"{row.tolerance:g}"

