"""Compare a run against a baseline run, case by case, and flag only regressions a CI can trust.

1. **Like for like or refuse.** The two runs must share the model (name and weight fingerprint), the dataset
   (resolved spec and the file's sha256), the perplexity corpus (spec, texts asked for, the file's sha256), the
   thresholds and the run settings of :data:`RUN_SETTINGS` (``--seq-edits``, ``--batch-size``, ``--ppl-schedule``,
   ``--wild-dataset``, ``--hard-dataset``; a setting one run records and the other, older one does not is a
   note); otherwise :func:`compare` returns a refusal (one line, ``harness compare`` exits 2) unless
   ``allow_different=True`` (``--allow-different``), which turns it into notes. A different key-statistics corpus is a note, not a refusal:
   it is part of the editors' setting under test. Runs on different machines (:data:`MACHINE_FACTS`: device, GPU,
   CPU count, torch threads, torch version) are compared, but their phase timings are not (one note says so;
   ``--allow-different`` compares them anyway). A run with two records of one case (same suite, editor, case id
   and test id) is refused: which one counts would be arbitrary.
2. **Paired.** Records are matched by (suite, editor, case id, test id; an editor alias such as ``ft`` reads as its
   canonical name ``ft_l``); each metric is compared over the cases both runs have, as the metric registry
   aggregates it (mean for scores, median for phase timings).
3. **Beyond tolerance and significant.** A metric regresses when the paired change of its aggregate (current -
   baseline, or current / baseline - 1 for relative metrics) is worse than its tolerance *and* the 95% paired
   bootstrap interval of that change lies entirely on the worse side of zero. Beyond tolerance but not
   significant is reported as ``not significant`` and does not fail. ``edits_to_collapse`` (one count per
   sequential stream; a missing value means never collapsed) regresses when its minimum drops by more than its
   tolerance. A metric with no direction in the registry (or not registered) is never compared; it is listed.
4. **Nothing silently dropped.** A (suite, editor) of the baseline absent from the run is ``missing``, and so is
   one of which more than :data:`MAX_MISSING_CASES` (a quarter) of the baseline's cases are absent (``cases``:
   not like for like); fewer absent cases are a note naming how many. A test that passed in the baseline and
   fails (or errors) in the run is a regression: ``fewer passed`` when the pass rate went down, else ``newly
   failed``; a note names the tests. A metric that is a number in the baseline and not in the run (null, NaN,
   text) is ``not a number``; one the baseline's records have and the run's lack (a removed key, also
   ``edits_to_collapse``, whose null means "never collapsed") is ``metric missing``; a value that cannot be (a
   negative ratio, perplexity, KL, count or time: the relative metrics and phase timings) is ``impossible``. All
   count as regressions, never as improvements; the same in the baseline (``baseline ...``) is reported, not
   compared.

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
from typing import Any

from harness.editor_aliases import canonical_editor
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
from harness.data.resolved import DIGEST_FIELDS
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
REGRESSION_STATUSES = ("regressed", "missing", "not a number", "metric missing", "impossible", "fewer passed",
                       "newly failed")
STATUSES = ("ok", "regressed", "improved", "not significant", "missing", "not a number", "metric missing",
            "impossible", "baseline not a number", "baseline impossible", "fewer passed", "newly failed")
# settings recorded in the run's config that change what the suites measure: unlike values are not like for like
RUN_SETTINGS = ("seq_edits", "batch_size", "ppl_schedule", "wild_dataset", "hard_dataset")
# machine facts (run JSON "machine") that make phase timings incomparable when they differ
MACHINE_FACTS = ("device", "gpu_name", "cpu_count", "torch_threads", "torch")
MAX_MISSING_CASES = 0.25     # more than this share of a (suite, editor)'s baseline cases absent: "missing"

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
    if b_ppl and r_ppl and _unlike(b_ppl, r_ppl):   # perplexities of different texts: their ratios do not compare
        out.append(f"perplexity corpus differs ({_describe(b_ppl)} vs {_describe(r_ppl)})")
    bt, rt = thresholds_of(baseline), thresholds_of(run)
    changed = sorted(k for k in set(bt) | set(rt) if bt.get(k) != rt.get(k) and k in bt and k in rt)
    if changed:
        out.append("thresholds differ (" + ", ".join(f"{k} {bt[k]} vs {rt[k]}" for k in changed) + ")")
    bs, rs = _config(baseline), _config(run)
    settings = [k for k in RUN_SETTINGS if k in bs and k in rs and bs[k] != rs[k]]
    if settings:
        out.append("run settings differ (" + ", ".join(f"{k} {bs[k]!r} vs {rs[k]!r}" for k in settings) + ")")
    return out


def _config(run: dict) -> dict:
    config = run.get("config")
    return config if isinstance(config, dict) else {}


def unrecorded_settings(baseline: dict, run: dict) -> list[str]:
    """A note when one run records settings of :data:`RUN_SETTINGS` that the other (an older run) does not: those
    are not checked. (Two runs that record none of them were both written before they were recorded.)"""
    out = []
    for (which, r), other in ((("baseline", baseline), run), (("run", run), baseline)):
        absent = [k for k in RUN_SETTINGS if k not in _config(r) and k in _config(other)]
        if absent:
            out.append(f"the {which} does not record {', '.join(absent)} (an older run): not checked for like for "
                       "like")
    return out


def machine_differences(baseline: dict, run: dict) -> list[str]:
    """The :data:`MACHINE_FACTS` both runs record and that differ, as ``fact 'a' vs 'b'``."""
    bm, rm = (r.get("machine") if isinstance(r.get("machine"), dict) else {} for r in (baseline, run))
    return [f"{k} {bm[k]!r} vs {rm[k]!r}" for k in MACHINE_FACTS if k in bm and k in rm and bm[k] != rm[k]]


# --------------------------------------------------------------------------- matching and comparing
def case_key(record: dict) -> CaseKey:
    """(suite, editor, case id, test id): the test id (function name and parameters, no file path) tells apart
    the records of one case in several tests, e.g. the five editing problems. An editor alias (``ft``) reads as
    its canonical name (``ft_l``), in the test id's parameters too."""
    nodeid = str(record.get("nodeid") or "")
    return suite_of(record), editor_of(record), str(record.get("case_id")), _test_id(record, nodeid.split("::")[-1])


def _test_id(record: dict, test_id: str) -> str:
    raw = record.get("editor")
    name = canonical_editor(raw)
    if not isinstance(raw, str) or name == raw or "[" not in test_id or not test_id.endswith("]"):
        return test_id
    function, params = test_id[:-1].split("[", 1)
    parts = params.split("-")
    if raw in parts:
        parts[parts.index(raw)] = name
    return f"{function}[{'-'.join(parts)}]"


class _Refused(Exception):
    """Raised inside :func:`compare` with the one-line reason; returned as ``CompareResult.refused``."""


def _by_case(run: dict, which: str) -> dict[tuple[str, str], dict[CaseKey, dict]]:
    groups: dict[tuple[str, str], dict[CaseKey, dict]] = defaultdict(dict)
    seen: set[CaseKey] = set()
    for rec in run.get("records") or []:
        if not isinstance(rec, dict):
            continue
        key = case_key(rec)
        if key in seen:
            suite, editor, case, test = key
            raise _Refused(f"the {which} has two records of {suite}/{editor} case {case} ({test}); a run has one "
                           "record per test (join shards with harness merge, which refuses a test run twice)")
        seen.add(key)
        if rec.get("outcome") != "skipped":
            groups[(suite_of(rec), editor_of(rec))][key] = rec
    return groups


def _unlike(b: dict, r: dict) -> bool:
    """Two corpus settings (``corpus_setting``) differ: in their configuration, or in a digest of the resolvers'
    records (``sha256``, ``content_sha256``) that both runs recorded (a run recorded before a digest existed, or a
    process that never loaded the texts, has nothing to compare on it)."""
    config = [k for k in set(b) | set(r) if k not in DIGEST_FIELDS]
    return any(b.get(k) != r.get(k) for k in config) or \
        any(b[k] != r[k] for k in DIGEST_FIELDS if k in b and k in r)


def _describe(setting: dict) -> str:
    return ", ".join(f"{k} {str(v)[:12] if k.endswith('sha256') else v}" for k, v in setting.items())


def setting_notes(baseline: dict, run: dict) -> list[str]:
    """Differences that are part of what is being compared (the editors' setting), said but not refused: the key
    statistics corpus changes the editors' updates, as a hyper-parameter does."""
    b, r = (corpus_setting(run_corpora(x).get("statistics")) for x in (baseline, run))
    if b and r and _unlike(b, r):
        return [f"key statistics corpus differs ({_describe(b)} vs {_describe(r)}): "
                "the editors' updates differ by construction"]
    return []


def _editors_provenance(run: dict) -> dict[str, dict]:
    prov = run.get("provenance") if isinstance(run.get("provenance"), dict) else {}
    editors = prov.get("editors") if isinstance(prov.get("editors"), dict) else {}
    return {canonical_editor(k): v for k, v in editors.items() if isinstance(v, dict)}


def _code_label(code: Any) -> str | None:
    if not isinstance(code, dict):
        return None
    if code.get("package"):
        return f"{code['package']} {code.get('version')}" + (f" sha256 {str(code['sha256'])[:12]}"
                                                               if code.get("sha256") else "")
    return f"sha256 {str(code['sha256'])[:12]}" if code.get("sha256") else None


def editor_notes(baseline: dict, run: dict) -> list[str]:
    """One note when an editor both runs record ran with other code (``provenance.editors.<e>.code``: package and
    version, or its source files' digest) or other settings (resolved hyper-parameters): the comparison measures
    the change, it is not refused."""
    b, r = _editors_provenance(baseline), _editors_provenance(run)
    parts = []
    for name in sorted(set(b) & set(r)):
        bc, rc = _code_label(b[name].get("code")), _code_label(r[name].get("code"))
        changed = []
        if bc and rc and bc != rc:
            changed.append(f"code {bc} vs {rc}")
        bh, rh = b[name].get("hparams"), r[name].get("hparams")
        if isinstance(bh, dict) and isinstance(rh, dict) and bh != rh:
            keys = sorted(k for k in set(bh) | set(rh) if bh.get(k) != rh.get(k))
            changed.append("settings " + ", ".join(f"{k} {bh.get(k)!r} vs {rh.get(k)!r}" for k in keys[:4])
                           + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else ""))
        if changed:
            parts.append(f"{name}: {'; '.join(changed)}")
    return [f"editor code or settings differ ({' | '.join(parts)}): the editors' results differ by construction"
            ] if parts else []


def compare(baseline: dict, run: dict, tolerances: dict | None = None, *, allow_different: bool = False
            ) -> CompareResult:
    """Compare ``run`` against ``baseline`` case by case (module docstring)."""
    tol = {**DEFAULT_TOLERANCES, **(tolerances or {})}
    try:
        base_groups, cur_groups = _by_case(baseline, "baseline"), _by_case(run, "run")
    except _Refused as e:
        return CompareResult([], refused=str(e))
    diffs = differences(baseline, run)
    if diffs and not allow_different:
        return CompareResult([], refused="; ".join(diffs) + " (pass --allow-different to compare anyway)")
    result = CompareResult([], notes=[f"{d} (compared anyway: --allow-different)" for d in diffs]
                           + unrecorded_settings(baseline, run) + setting_notes(baseline, run)
                           + editor_notes(baseline, run))
    machines = machine_differences(baseline, run)
    skip_timings = bool(machines) and not allow_different
    if machines:
        result.notes.append(f"machines differ ({', '.join(machines)}): phase timings are not comparable; "
                            + ("not compared (--allow-different compares them)" if skip_timings
                               else "compared anyway (--allow-different)"))
    not_compared: set[str] = set()
    for (suite, editor), base_cases in base_groups.items():
        cur_cases = cur_groups.get((suite, editor), {})
        shared = [k for k in base_cases if k in cur_cases]
        if not shared:
            result.rows.append(CompareRow(suite, editor, "*", None, None, None, None, "missing"))
            continue
        if len(shared) < len(base_cases):
            absent = len(base_cases) - len(shared)
            too_many = absent > MAX_MISSING_CASES * len(base_cases)
            if too_many:
                result.rows.append(CompareRow(suite, editor, "cases", float(len(base_cases)), float(len(shared)),
                                              float(-absent), None, "missing", n=absent))
            result.notes.append(f"{suite}/{editor}: {absent} of {len(base_cases)} baseline cases are not in the run"
                                + (f" (more than {MAX_MISSING_CASES:.0%}: not like for like, a regression)"
                                   if too_many else "") + "; compared on the shared ones")
        pairs = [(base_cases[k], cur_cases[k]) for k in shared]
        result.rows.append(_pass_rate_row(suite, editor, pairs, result.notes))
        for name in record_names(base_cases[k] for k in shared):
            spec = metric_spec(name)
            if spec.aggregation == "none":
                continue
            if spec.higher_is_better is None:
                not_compared.add(name)
                continue
            if skip_timings and name.startswith("timings."):
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


def _pass_rate_row(suite: str, editor: str, pairs: list[tuple[dict, dict]], notes: list[str]) -> CompareRow:
    """Passed tests among the shared cases. A test that passed in the baseline and fails in the run is a
    regression (whatever its metrics say): ``fewer passed`` when the pass rate went down, else ``newly failed``
    (as many others were fixed); a note names the tests."""
    b = sum(r.get("outcome") == "passed" for r, _ in pairs) / len(pairs)
    c = sum(r.get("outcome") == "passed" for _, r in pairs) / len(pairs)
    newly_failed = [case_key(cr)[3] for br, cr in pairs
                    if br.get("outcome") == "passed" and cr.get("outcome") in FAILED_OUTCOMES]
    if not newly_failed:
        status = "improved" if c > b + _EPS else "ok"
    else:
        status = "fewer passed" if c < b - _EPS else "newly failed"
        shown = ", ".join(newly_failed[:5]) + (f" and {len(newly_failed) - 5} more" if len(newly_failed) > 5 else "")
        notes.append(f"{suite}/{editor}: {len(newly_failed)} test(s) passed in the baseline and fail in the run: "
                     f"{shown}")
    return CompareRow(suite, editor, "pass_rate", b, c, c - b, None, status, n=len(pairs))


def _compare_metric(suite: str, editor: str, spec: MetricSpec, pairs: list[tuple[dict, dict]], tolerance: float,
                    time_floor: float) -> CompareRow | None:
    name = spec.name
    present = [(b, c) for b, c in pairs if _has(b, name)]
    if not present:
        return None
    row = CompareRow(suite, editor, name, None, None, None, tolerance, "ok", spec.relative, n=len(present))
    lost = sum(not _has_key(c, name) for _, c in present)
    if lost:                       # the baseline's records have it, the run's do not: never read as "never"/better
        row.status, row.n = "metric missing", lost
        return row
    impossible = _impossible(spec, [record_value(c, name) for _, c in present])
    if impossible:
        row.status, row.n = "impossible", impossible
        return row
    if _impossible(spec, [record_value(b, name) for b, _ in present]):
        row.status = "baseline impossible"
        return row
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


def _has_key(record: dict, name: str) -> bool:
    """Whether the record carries ``name`` at all (a null value counts: it is a recorded "not a number" or, for
    edits_to_collapse, "never")."""
    if name.startswith("timings."):
        return True          # a lost timing reads as null: "not a number", as before
    metrics = record.get("metrics")
    return isinstance(metrics, dict) and name in metrics


def _impossible(spec: MetricSpec, values: list) -> int:
    """How many values cannot be: negative ratios, perplexities, KL, counts and times (the relative metrics and the
    phase timings, all >= 0 by construction)."""
    if not (spec.relative or spec.name.startswith("timings.")):
        return 0
    return sum(v is not None and v < 0 for v in map(to_number, values))


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

