"""Leaderboard across runs: one row per (model, editor), ranked by a ROME-style score.

The score is the harmonic mean of efficacy (efficacy_success), generalization
(paraphrase_success) and locality (neighborhood_success), over those that were measured.
Means (efficacy ... ppl_ratio, time_per_edit_s) are over the non-sequential records, since a
sequential record measures the model after a whole series of edits (its damage shows in
edits_to_collapse); only when an editor has no other records are sequential ones used.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from harness.report import (
    as_number,
    editor_of,
    fmt,
    is_skipped,
    load_run,
    mean,
    metric,
    model_name,
    suite_of,
    template_env,
    timings,
)

COLUMNS = [
    "model", "editor", "score", "n", "efficacy", "generalization", "locality", "ppl_ratio",
    "edits_to_collapse", "downstream_drop", "time_per_edit_s", "runs",
]
_MEAN_COLUMNS = {
    "efficacy": "efficacy_success",
    "generalization": "paraphrase_success",
    "locality": "neighborhood_success",
    "ppl_ratio": "ppl_ratio",
}
# How each column is written in the markdown / HTML tables.
_FORMATS = {
    "score": "{:.3f}", "efficacy": "{:.3f}", "generalization": "{:.3f}", "locality": "{:.3f}",
    "ppl_ratio": "{:.3f}", "downstream_drop": "{:+.3f}", "time_per_edit_s": "{:.3g}",
}
_DOWNSTREAM = re.compile(r"^downstream_(.+)_(before|after)$")


def load_runs(paths: Iterable[str | Path]) -> list[dict]:
    """Load and validate run JSONs; a bad file raises RunFileError with a one-line message naming it."""
    return [load_run(p) for p in paths]


def harmonic_mean(values: Iterable[float | None]) -> float | None:
    """Harmonic mean of the values that are present (0 if any is <= 0); None when none are."""
    nums = [v for v in values if v is not None and not math.isnan(v)]
    if not nums:
        return None
    if any(v <= 0 for v in nums):
        return 0.0
    return len(nums) / sum(1.0 / v for v in nums)


def downstream_drops(record: dict) -> list[float]:
    """before - after for every downstream task with both values in the record."""
    values: dict[str, dict[str, float]] = {}
    for name, value in (record.get("metrics") or {}).items():
        match = _DOWNSTREAM.match(name)
        num = as_number(value)
        if match and num is not None:
            values.setdefault(match.group(1), {})[match.group(2)] = num
    return [v["before"] - v["after"] for v in values.values() if {"before", "after"} <= v.keys()]


def leaderboard(runs: Iterable[dict]) -> pd.DataFrame:
    """One row per (model, editor) over all runs, sorted by model then score (descending)."""
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for index, run in enumerate(runs):
        model = model_name(run)
        for rec in run.get("records") or []:
            if not isinstance(rec, dict) or is_skipped(rec):
                continue
            group = groups.setdefault((model, editor_of(rec)), {"records": [], "runs": set()})
            group["records"].append(rec)
            group["runs"].add(run.get("run_id") or f"#{index}")

    rows = []
    for (model, editor), group in groups.items():
        recs = group["records"]
        row: dict[str, Any] = {"model": model, "editor": editor, "n": len(recs), "runs": len(group["runs"])}
        single = [r for r in recs if suite_of(r) != "sequential"] or recs
        for column, name in _MEAN_COLUMNS.items():
            row[column] = mean(metric(r, name) for r in single)
        row["score"] = harmonic_mean([row["efficacy"], row["generalization"], row["locality"]])
        collapse = [as_number(metric(r, "edits_to_collapse")) for r in recs if suite_of(r) == "sequential"]
        row["edits_to_collapse"] = min((c for c in collapse if c is not None), default=None)
        row["downstream_drop"] = mean(d for r in recs for d in downstream_drops(r))
        row["time_per_edit_s"] = mean(timings(r).get("edit") for r in single)
        rows.append(row)

    df = pd.DataFrame(rows, columns=COLUMNS)
    for column in ("score", *_MEAN_COLUMNS, "downstream_drop", "time_per_edit_s"):
        df[column] = df[column].astype("float64")
    df["edits_to_collapse"] = df["edits_to_collapse"].astype("Int64")
    df = df.sort_values(["model", "score"], ascending=[True, False], na_position="last", kind="stable")
    return df.reset_index(drop=True)


def format_cell(column: str, value: Any) -> str:
    """A leaderboard value as text; missing values as '-'."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if column in _FORMATS:
        return _FORMATS[column].format(float(value))
    if column in ("n", "runs", "edits_to_collapse"):
        return str(int(value))
    return fmt(value)


def to_markdown(df: pd.DataFrame) -> str:
    """The leaderboard as a GitHub-flavoured markdown table (no tabulate needed)."""
    columns = list(df.columns)

    def cell(text: str) -> str:
        return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")

    numeric = {c for c in columns if pd.api.types.is_numeric_dtype(df[c])}
    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---:" if c in numeric else "---" for c in columns) + "|",
    ]
    for record in df.to_dict("records"):
        lines.append("| " + " | ".join(cell(format_cell(c, record[c])) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def write_leaderboard(runs: list[dict], out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``leaderboard.md`` and a self-contained ``index.html`` into out_dir; return both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    df = leaderboard(runs)

    md_path = out / "leaderboard.md"
    md_path.write_text(
        "# Knowledge-editing leaderboard\n\n"
        "score = harmonic mean of efficacy, generalization and locality; "
        "downstream_drop = mean (before - after) over downstream tasks.\n\n"
        + to_markdown(df)
        + "\nRuns:\n\n"
        + "".join(f"- `{r.get('run_id') or '?'}` ({model_name(r)}, started {r.get('started') or '?'})\n"
                  for r in runs),
        encoding="utf-8",
    )

    models = []
    for model, part in df.groupby("model", sort=False):
        models.append({
            "name": model,
            "rows": [[format_cell(c, rec[c]) for c in COLUMNS[1:]] for rec in part.to_dict("records")],
        })
    html_path = out / "index.html"
    html_path.write_text(
        template_env().get_template("leaderboard.html.j2").render(
            columns=COLUMNS[1:],
            models=models,
            runs=[_run_info(r) for r in runs],
        ),
        encoding="utf-8",
    )
    return md_path, html_path


def _run_info(run: dict) -> dict:
    machine = run.get("machine") if isinstance(run.get("machine"), dict) else {}
    config = run.get("config") if isinstance(run.get("config"), dict) else {}
    return {
        "run_id": run.get("run_id"),
        "model": model_name(run),
        "started": run.get("started"),
        "device": machine.get("gpu_name") or machine.get("device"),
        "editors": ", ".join(str(e) for e in config.get("editors") or []),
        "dataset": config.get("dataset"),
    }
