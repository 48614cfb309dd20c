"""Leaderboard across runs, like for like: one table per (model, dataset, suite), one row per editor.

* **Tables.** Runs are grouped by model name, dataset (resolved spec and file sha256; schema 1 runs: the spec as
  given) and suite; nothing is pooled across them. Records of the same case from several runs are counted once
  (the latest run's). An editor run with different resolved hyper-parameters gets its own row (``memit@1a2b3c``).
* **Numbers.** Every cell is the registry's aggregate over cases with its 95% bootstrap interval, and n.
* **Ranking rule** (documented in the output): rows with fewer than ``min_n`` cases are listed but not ranked.
  The others are ranked first by collapse, then by score: an editor with no collapsed case ranks above every
  editor with one, and among editors that collapsed fewer collapsed cases rank higher; ties in collapse are
  broken by the score (descending), then by the perplexity ratio's mean (ascending: less damage first), then by n.
  A case is collapsed when its ppl_ratio reached its run's collapse threshold or is not a finite number (NaN,
  written null: the suites count it as collapse too) or its sequential stream recorded edits_to_collapse. So a
  collapse can never be bought back by efficacy, nor hidden by a NaN.
  Editor aliases (``ft``) share their canonical editor's row (``ft_l``).
* **Score.** The first of :data:`RANK_BY` the table's records carry (``rome_score``: the per-case harmonic mean of
  efficacy, generalization and locality), else the first headline metric with a direction.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from harness.metrics.registry import (
    Aggregate,
    aggregate_records,
    headline_metrics,
    metric_spec,
    record_names,
    to_number,
)
from harness.report import (
    collapse_threshold,
    dataset_label,
    editor_of,
    fmt_aggregate,
    is_skipped,
    load_run,
    model_name,
    suite_of,
    template_env,
)
from harness.report.compare import case_key
from harness.report.escape import markdown_cell

RANK_BY = ("rome_score", "problem_score", "efficacy_final", "neighborhood_retained", "best_edit_success")
DEFAULT_MIN_N = 5
RULE = ("Ranking: editors with fewer than {min_n} cases are listed but not ranked (a sequential stream counts "
        "its edits: one stream of 5 edits is 5 cases for this rule, n = 1 for its intervals); the others rank first by "
        "collapse (no collapsed case above any collapsed case, fewer collapsed cases above more; a case is collapsed "
        "when its perplexity ratio reached the run's collapse threshold or is not a number, or its sequential stream "
        "collapsed), then by score (descending), then by perplexity ratio (ascending), then n. Cells: mean [95% "
        "bootstrap CI over cases]; timings: median.")


def load_runs(paths: Iterable[str | Path]) -> list[dict]:
    """Load and validate run JSONs; a bad file raises RunFileError with a one-line message naming it."""
    return [load_run(p) for p in paths]


@dataclass
class BoardRow:
    editor: str
    n: int
    runs: int
    collapsed: int
    score: Aggregate | None
    metrics: dict[str, Aggregate | None]
    rank: int | None = None
    edits: int | None = None       # a stream suite's row: the edits in its streams (None: a per-case suite)
    ppl_ratio: Aggregate | None = None    # the tie-break after the score

    @property
    def ranked(self) -> bool:
        return self.rank is not None

    def eligible(self, min_n: int) -> bool:
        """Enough cases to rank: records of a per-case suite, edits of a stream suite's streams."""
        return (self.edits if self.edits is not None else self.n) >= min_n


@dataclass
class BoardTable:
    model: str
    dataset: str
    suite: str
    score_metric: str | None
    columns: list[str]
    rows: list[BoardRow] = field(default_factory=list)
    legend: dict[str, str] = field(default_factory=dict)   # "editor@hash" -> what it stands for

    @property
    def title(self) -> str:
        return f"{self.model} / {self.dataset} / {self.suite}"


def _hparams_digest(run: dict, editor: str, raw: Any = None) -> str | None:
    """The editor's resolved hyper-parameters in the run's provenance, digested (under the name the run used:
    an older run may name an alias)."""
    prov = run.get("provenance") if isinstance(run.get("provenance"), dict) else {}
    editors = prov.get("editors") if isinstance(prov.get("editors"), dict) else {}
    entry = editors.get(editor, editors.get(raw))
    hp = entry.get("hparams") if isinstance(entry, dict) else None
    return hashlib.sha256(json.dumps(hp, sort_keys=True, default=str).encode()).hexdigest()[:6] if hp else None


def _editor_entry(run: dict, editor: str, raw: Any = None) -> dict:
    prov = run.get("provenance") if isinstance(run.get("provenance"), dict) else {}
    editors = prov.get("editors") if isinstance(prov.get("editors"), dict) else {}
    entry = editors.get(editor, editors.get(raw))
    return entry if isinstance(entry, dict) else {}


def _code_label(code: Any) -> str | None:
    if not isinstance(code, dict):
        return None
    if code.get("package"):
        return f"{code['package']} {code.get('version')}"
    return f"code sha256 {str(code['sha256'])[:12]}" if code.get("sha256") else None


def _legend(runs: list[dict]) -> dict[str, dict[str | None, dict]]:
    """editor -> hparams digest -> its provenance entry (hyper-parameters, code identity), from the runs."""
    out: dict[str, dict[str | None, dict]] = {}
    for run in runs:
        for rec in run.get("records") or []:
            if isinstance(rec, dict) and rec.get("editor") is not None:
                editor = editor_of(rec)
                digest = _hparams_digest(run, editor, rec.get("editor"))
                out.setdefault(editor, {}).setdefault(digest, _editor_entry(run, editor, rec.get("editor")))
    return out


def _stands_for(editor: str, digest: str | None, variants: dict[str | None, dict]) -> str:
    """What ``editor@digest`` stands for: the hyper-parameters that differ between the editor's variants in the
    table, and the editor's code (package and version, or its source digest)."""
    hps = {d: (e.get("hparams") if isinstance(e.get("hparams"), dict) else {}) for d, e in variants.items()}
    mine = hps.get(digest, {})
    keys = sorted(k for k in set().union(*hps.values()) if len({repr(h.get(k)) for h in hps.values()}) > 1)
    parts = [", ".join(f"{k}={mine.get(k)!r}" for k in keys)] if keys else []
    code = _code_label(variants.get(digest, {}).get("code"))
    if code:
        parts.append(code)
    return "; ".join(parts) or "hyper-parameters as recorded in the run's provenance"


def _is_collapsed(record: dict, threshold: float) -> bool:
    """As the suites judge it (harness.thresholds): a perplexity ratio that is not a finite number below the
    threshold (NaN, written null, and inf included) is a collapse; so is a sequential stream's edits_to_collapse."""
    metrics = record.get("metrics") if isinstance(record.get("metrics"), dict) else {}
    ratio = to_number(metrics.get("ppl_ratio"))
    collapse = to_number(metrics.get("edits_to_collapse"))
    broken = "ppl_ratio" in metrics and (ratio is None or not math.isfinite(ratio) or ratio >= threshold)
    return broken or collapse is not None


def _collect(runs: list[dict]) -> dict[tuple[str, str, str], dict[tuple[str, str | None], dict]]:
    """(model, dataset, suite) -> (editor, hparams digest) -> case key -> (record, collapsed, run id), latest
    run last so that its record of a case wins."""
    tables: dict[tuple[str, str, str], dict[tuple[str, str | None], dict]] = {}
    for index, run in sorted(enumerate(runs), key=lambda ir: (str(ir[1].get("started") or ""), ir[0])):
        threshold = collapse_threshold(run)
        for rec in run.get("records") or []:
            if not isinstance(rec, dict) or is_skipped(rec):
                continue
            table = tables.setdefault((model_name(run), dataset_label(run), suite_of(rec)), {})
            editor = editor_of(rec)
            cases = table.setdefault((editor, _hparams_digest(run, editor, rec.get("editor"))), {})
            cases[case_key(rec)] = (rec, _is_collapsed(rec, threshold), run.get("run_id") or f"#{index}")
    return tables


def _score_metric(names: list[str]) -> str | None:
    for name in RANK_BY:
        if name in names:
            return name
    directional = [n for n in headline_metrics(names) if metric_spec(n).higher_is_better is not None]
    return directional[0] if directional else None


def _score(records: list[dict], name: str | None) -> Aggregate | None:
    return aggregate_records(records, name) if name else None


def _rank(rows: list[BoardRow], min_n: int, score_metric: str | None) -> None:
    """Assign ranks by the documented rule (module docstring); unranked rows keep rank None and go last."""
    sign = -1.0 if score_metric and metric_spec(score_metric).higher_is_better else 1.0     # best first

    def key(row: BoardRow) -> tuple:
        value = row.score.value if row.score and row.score.value is not None else None
        score = sign * value if value is not None and math.isfinite(value) else math.inf
        ppl = row.ppl_ratio.value if row.ppl_ratio and row.ppl_ratio.value is not None else None
        damage = ppl if ppl is not None and math.isfinite(ppl) else math.inf
        return (not row.eligible(min_n), row.collapsed > 0, row.collapsed / max(row.n, 1), score, damage, -row.n,
                row.editor)

    rows.sort(key=key)
    for i, row in enumerate(r for r in rows if r.eligible(min_n)):
        row.rank = i + 1


def board_tables(runs: list[dict], min_n: int = DEFAULT_MIN_N) -> list[BoardTable]:
    """The leaderboard: one table per (model, dataset, suite), rows ranked by the documented rule."""
    out = []
    variants = _legend(runs)
    for (model, dataset, suite), editors in sorted(_collect(runs).items()):
        digests: dict[str, set] = {}
        for editor, digest in editors:
            digests.setdefault(editor, set()).add(digest)
        all_records = [rec for cases in editors.values() for rec, _, _ in cases.values()]
        names = record_names(all_records)
        score_metric = _score_metric(names)
        columns = [n for n in headline_metrics(names) if n != score_metric] + \
                  (["timings.edit"] if "timings.edit" in names else [])
        table = BoardTable(model, dataset, suite, score_metric, columns)
        for (editor, digest), cases in editors.items():
            records = [rec for rec, _, _ in cases.values()]
            label = f"{editor}@{digest}" if len(digests[editor]) > 1 and digest else editor
            if label != editor:
                table.legend[label] = _stands_for(editor, digest, {d: variants.get(editor, {}).get(d, {})
                                                                   for d in digests[editor]})
            edits = [to_number((rec.get("metrics") or {}).get("n_edits")) for rec in records]
            table.rows.append(BoardRow(label, len(records), len({r for _, _, r in cases.values()}),
                                       sum(c for _, c, _ in cases.values()), _score(records, score_metric),
                                       {n: aggregate_records(records, n) for n in columns},
                                       edits=int(sum(edits)) if edits and None not in edits else None,
                                       ppl_ratio=aggregate_records(records, "ppl_ratio")))
        _rank(table.rows, min_n, score_metric)
        out.append(table)
    return out


def leaderboard(runs: Iterable[dict], min_n: int = DEFAULT_MIN_N) -> pd.DataFrame:
    """The leaderboard as one long-form frame: a row per (model, dataset, suite, editor) with rank (NA: not
    ranked), n, runs, collapsed cases, score and every column's value, ci_low, ci_high."""
    rows = []
    for table in board_tables(list(runs), min_n):
        for row in table.rows:
            out: dict[str, Any] = {"model": table.model, "dataset": table.dataset, "suite": table.suite,
                                   "rank": row.rank, "editor": row.editor, "n": row.n, "runs": row.runs,
                                   "collapsed": row.collapsed, "score_metric": table.score_metric}
            for name, agg in [("score", row.score), *row.metrics.items()]:
                out[name] = agg.value if agg else None
                out[f"{name}_ci_low"] = agg.low if agg else None
                out[f"{name}_ci_high"] = agg.high if agg else None
            rows.append(out)
    df = pd.DataFrame(rows)
    if not df.empty:
        df["rank"] = df["rank"].astype("Int64")
    return df


# --------------------------------------------------------------------------- output
def _cells(table: BoardTable, row: BoardRow, escape: Callable[[str], str] = str) -> list[str]:
    """A row's cells; only the editor is run-provided text (``escape`` is applied to it), the rest are numbers."""
    editor = escape(row.editor) + (" (collapsed)" if row.collapsed else "")
    n = f"{row.n} ({row.edits} edits)" if row.edits is not None else str(row.n)
    return [str(row.rank) if row.rank else "-", editor, n, str(row.runs), f"{row.collapsed}/{row.n}",
            fmt_aggregate(row.score, None, 4), *[fmt_aggregate(row.metrics[c], None, 4) for c in table.columns]]


def _headers(table: BoardTable) -> list[str]:
    score = f"score ({metric_spec(table.score_metric).display})" if table.score_metric else "score"
    return ["rank", "editor", "n", "runs", "collapsed", score, *[metric_spec(c).display for c in table.columns]]


def to_markdown(tables: list[BoardTable], min_n: int = DEFAULT_MIN_N) -> str:
    """The leaderboard as GitHub-flavoured markdown: a heading and a table per (model, dataset, suite); every
    cell escaped (no HTML, links or emphasis from run fields)."""
    parts = [RULE.format(min_n=min_n), ""]
    for table in tables:
        headers = _headers(table)
        parts.append("## " + markdown_cell(table.title))
        parts.append("")
        parts.append("| " + " | ".join(markdown_cell(h) for h in headers) + " |")
        parts.append("|" + "|".join("---" if h == "editor" else "---:" for h in headers) + "|")
        parts.extend("| " + " | ".join(_cells(table, row, markdown_cell)) + " |" for row in table.rows)
        parts.append("")
        if table.legend:        # what each editor@hash stands for (its settings and code)
            parts.extend(f"- {markdown_cell(label)}: {markdown_cell(text)}" for label, text in table.legend.items())
            parts.append("")
    if not tables:
        parts.append("No records in the given runs.")
    return "\n".join(parts) + "\n"


def write_leaderboard(runs: list[dict], out_dir: str | Path, min_n: int = DEFAULT_MIN_N) -> tuple[Path, Path]:
    """Write ``leaderboard.md`` and a self-contained ``index.html`` into out_dir; return both paths."""
    from harness.run import atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tables = board_tables(runs, min_n)
    md = ("# Knowledge-editing leaderboard\n\n" + to_markdown(tables, min_n) + "\nRuns:\n\n"
          + "".join(f"- run {markdown_cell(r.get('run_id') or '?')}: model {markdown_cell(model_name(r))}, dataset "
                    f"{markdown_cell(dataset_label(r))}, started {markdown_cell(r.get('started') or '?')}\n"
                    for r in runs))
    md_path = atomic_write_text(out / "leaderboard.md", md)
    html = template_env().get_template("leaderboard.html.j2").render(
        rule=RULE.format(min_n=min_n),
        tables=[{"title": t.title, "headers": _headers(t),
                 "tooltips": ["", "", "cases (records) aggregated; a stream suite: streams (their edits)",
                              "runs pooled", "collapsed cases",
                              metric_spec(t.score_metric).tooltip if t.score_metric else "",
                              *[metric_spec(c).tooltip for c in t.columns]],
                 "rows": [{"cells": _cells(t, r), "ranked": r.ranked, "collapsed": r.collapsed} for r in t.rows],
                 "legend": dict(t.legend)}
                for t in tables],
        runs=[_run_info(r) for r in runs])
    html_path = atomic_write_text(out / "index.html", html)
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
        "dataset": dataset_label(run),
        "schema_version": run.get("schema_version"),
    }


__all__ = ["BoardRow", "BoardTable", "DEFAULT_MIN_N", "RANK_BY", "board_tables", "leaderboard",
           "load_runs", "to_markdown", "write_leaderboard"]
