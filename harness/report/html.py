"""Self-contained HTML report for one run: tables from a Jinja2 template, plots as inline SVG.

Plots are drawn with matplotlib on an explicit Agg canvas (``FigureCanvasAgg``) through the
object-oriented ``Figure`` API, so no GUI backend is touched and pyplot's global state (and any
backend the caller chose) is left alone. Only editor, metric and phase names reach plot labels,
and those are reduced to a safe character set first.
"""

from __future__ import annotations

import io
import json
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from harness.report import (
    as_number,
    editor_of,
    editors_of,
    is_skipped,
    mean,
    metric,
    model_name,
    ordered_phases,
    suite_of,
    template_env,
    timings,
)

# Metrics shown first (and summarised per editor), with their display names.
KEY_METRICS = {
    "efficacy_success": "efficacy",
    "paraphrase_success": "generalization",
    "neighborhood_success": "locality",
    "ppl_ratio": "ppl ratio",
}
SCORE_METRICS = ("efficacy_success", "paraphrase_success", "neighborhood_success")
FAILED_OUTCOMES = ("failed", "error")

_SVG_RC = {"svg.fonttype": "path", "svg.hashsalt": "harness-report", "font.size": 9}


# --------------------------------------------------------------------------- public API


def render_html(run: dict) -> str:
    """Render the run as one self-contained HTML document (no external resources, no scripts)."""
    return template_env().get_template("run.html.j2").render(**build_context(run))


def write_html(run: dict, path: str | Path) -> Path:
    """Render the run and write it to ``path`` (parent folders are created); return the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_html(run), encoding="utf-8")
    return out


# --------------------------------------------------------------------------- template context


def build_context(run: dict) -> dict:
    """Everything the template needs, computed from the run dict (missing parts are tolerated)."""
    records = [r for r in run.get("records") or [] if isinstance(r, dict)]
    editors = editors_of(run)
    config = run.get("config") if isinstance(run.get("config"), dict) else {}
    thresholds = config.get("thresholds") if isinstance(config.get("thresholds"), dict) else {}
    return {
        "title": f"{model_name(run)} - run {run.get('run_id') or '?'}",
        "model_name": model_name(run),
        "run": {k: run.get(k) for k in ("run_id", "started", "finished", "duration_s", "schema_version")},
        "model": _items(run.get("model")),
        "machine": _items(run.get("machine")),
        "config": {
            "editors": ", ".join(str(e) for e in config.get("editors") or []),
            "dataset": config.get("dataset"),
            "thresholds": _items(thresholds),
            "hparams": _pretty_json(config.get("hparams")),
            "argv": " ".join(str(a) for a in config.get("argv") or []),
        },
        "summary": summary_table(records, editors),
        "failures": [_record_row(r, []) for r in records if r.get("outcome") in FAILED_OUTCOMES],
        "plots": build_plots(records, editors, as_number(thresholds.get("collapse_ppl_ratio"))),
        "suites": suite_tables(records),
    }


def _items(mapping: Any) -> list[tuple[str, Any]]:
    return [(str(k), v) for k, v in mapping.items()] if isinstance(mapping, dict) else []


def _pretty_json(value: Any) -> str | None:
    return json.dumps(value, indent=2, sort_keys=True, default=str) if value else None


def summary_table(records: list[dict], editors: list[str]) -> dict:
    """Per-editor counts, key metric means, min edits to collapse, mean seconds per phase, peak memory.

    Key metric means leave out sequential records (they measure the model after many edits)
    unless the editor has no others, as in the leaderboard."""
    phases = ordered_phases(k for r in records for k in timings(r))
    rows = []
    for editor in editors:
        recs = [r for r in records if editor_of(r) == editor]
        if not recs:
            continue
        outcomes = [r.get("outcome") for r in recs]
        active = [r for r in recs if not is_skipped(r)]
        collapse = [as_number(metric(r, "edits_to_collapse")) for r in active]
        single = [r for r in active if suite_of(r) != "sequential"] or active
        rows.append({
            "editor": editor,
            "n": len(recs),
            "passed": outcomes.count("passed"),
            "failed": sum(o in FAILED_OUTCOMES for o in outcomes),
            "skipped": outcomes.count("skipped"),
            "metrics": [mean(metric(r, m) for r in single) for m in KEY_METRICS],
            "edits_to_collapse": min((c for c in collapse if c is not None), default=None),
            "phases": [mean(timings(r).get(p) for r in active) for p in phases],
            "memory": _peak_memory(active),
            "perplexity": _ppl_protocols(active),
        })
    return {"metric_names": list(KEY_METRICS.values()), "phases": phases, "rows": rows}


def _ppl_protocols(records: list[dict]) -> str:
    """How the editor's perplexity after editing was measured (an in-context editor's is read after its prefix)."""
    seen = dict.fromkeys(p for r in records for k in ("ppl_ratio", "ppl_curve")
                         if isinstance(p := (r.get("protocols") or {}).get(k), str))
    return "; ".join(seen)


def _peak_memory(records: list[dict]) -> str | None:
    peaks: dict[str, float] = {}
    for rec in records:
        for key, value in (rec.get("memory") or {}).items():
            num = as_number(value)
            if num is not None:
                peaks[key] = max(num, peaks.get(key, num))
    labels = {"peak_rss_mb": "RSS", "peak_gpu_mb": "GPU"}
    return ", ".join(f"{labels.get(k, k)} {v:,.0f} MB" for k, v in sorted(peaks.items())) or None


def suite_tables(records: list[dict]) -> list[dict]:
    """One table per suite (in order of appearance) with a column per scalar metric."""
    by_suite: dict[str, list[dict]] = defaultdict(list)
    for rec in records:
        by_suite[suite_of(rec)].append(rec)
    tables = []
    for suite, recs in by_suite.items():
        scalars = {
            name
            for r in recs
            for name, value in (r.get("metrics") or {}).items()
            if value is None or as_number(value) is not None
        }
        columns = [m for m in KEY_METRICS if m in scalars] + sorted(scalars - set(KEY_METRICS))
        tables.append({
            "suite": suite,
            "columns": columns,
            "rows": [_record_row(r, columns) for r in recs],
            "n_failed": sum(r.get("outcome") in FAILED_OUTCOMES for r in recs),
        })
    return tables


def _record_row(rec: dict, columns: list[str]) -> dict:
    message = rec.get("message")
    message = None if message is None else str(message)
    return {
        "nodeid": str(rec.get("nodeid") or ""),
        "suite": suite_of(rec),
        "editor": editor_of(rec),
        "case_id": rec.get("case_id"),
        "subject": rec.get("subject"),
        "outcome": str(rec.get("outcome") or "unknown"),
        "cells": [metric(rec, c) for c in columns],
        "time": sum(n for n in map(as_number, timings(rec).values()) if n is not None) or None,
        "message": message,
        "message_head": message.strip().splitlines()[0] if message and message.strip() else message,
    }


# --------------------------------------------------------------------------- plots


def build_plots(records: list[dict], editors: list[str], collapse_ratio: float | None) -> list[dict]:
    """All plots whose data is present, each as {"title", "caption", "svg"}."""
    active = [r for r in records if not is_skipped(r)]
    makers = [
        ("Perplexity vs number of edits", "Perplexity relative to the unedited model along each "
         "sequential-editing run; the dashed line is the collapse threshold.",
         lambda: plot_ppl_curves(active, editors, collapse_ratio)),
        ("Downstream accuracy vs perplexity", "Accuracy per downstream task against perplexity at each state of "
         "a sequential run (base model, then after each edit); the legend gives the Spearman correlation.",
         lambda: plot_downstream_vs_ppl(active, editors)),
        ("Edited-layer norm growth", "L1 norm of the edited weights after each number of edits.",
         lambda: plot_series(active, editors, "norm_l1", "L1 norm of edited weights")),
        ("Time per phase", "Mean seconds per test record, stacked by phase, per editor and suite.",
         lambda: plot_timings(active, editors)),
        ("Perplexity ratio distribution", "ppl_after / ppl_before per record outside sequential "
         "runs (box per editor, dots are records); the dashed line is the collapse threshold.",
         lambda: plot_ppl_ratio([r for r in active if not metric(r, "ppl_curve")], editors, collapse_ratio)),
        ("Score distributions", "Per-record efficacy, generalization (paraphrase) and locality "
         "(neighborhood) scores.",
         lambda: plot_scores(active, editors)),
        ("Causal tracing: average effect per layer", "P(answer | noised subject, clean state restored at the "
         "subject's last token) - P(answer | noised subject), averaged over the traced facts, per layer and kind "
         "(residual stream; MLP and attention outputs restored over a window of layers).",
         lambda: plot_tracing_heatmap(active)),
        ("Layer sweep: edit success and tracing effect per layer", "Mean edit success (rewrite score) of an edit "
         "at each swept layer, per editor and window (solid), and the mean tracing effect at that layer (dashed); "
         "the legend gives R^2 of edit success on the tracing effect and on the layer.",
         lambda: plot_layer_sweep(active)),
    ]
    plots = []
    for title, caption, make in makers:
        fig = make()
        if fig is not None:
            plots.append({"title": title, "caption": caption, "svg": figure_to_svg(fig, f"plot{len(plots)}")})
    return plots


def figure_to_svg(fig: Figure, id_prefix: str) -> str:
    """Serialise a figure to an inline-able ``<svg>`` element.

    The XML prolog, doctype and metadata are dropped, and every element id is prefixed so that
    several SVGs can live in one HTML document (matplotlib reuses ids such as glyph names).
    """
    FigureCanvasAgg(fig)
    buf = io.StringIO()
    with matplotlib.rc_context(_SVG_RC):
        fig.savefig(buf, format="svg", metadata={"Date": None}, bbox_inches="tight")
    svg = buf.getvalue()
    svg = svg[svg.index("<svg"):]
    svg = re.sub(r"\s*<metadata>.*?</metadata>", "", svg, flags=re.S)
    ids = set(re.findall(r'\bid="([^"]+)"', svg))

    def prefix(match: re.Match) -> str:
        head, name = match.group(1), match.group(2)
        return f"{head}{id_prefix}-{name}" if name in ids else match.group(0)

    return re.sub(r'(\bid="|href="#|url\(#)([^")]+)', prefix, svg)


def safe_label(text: Any) -> str:
    """A plot label from a name: letters, digits and ``_.+-`` only (no markup, no mathtext)."""
    label = re.sub(r"[^\w.+\-]", "_", str(text))[:40].lstrip("_")
    return label or "unnamed"


def _new_figure(width: float = 7.0, height: float = 3.8) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


def _points(series: Any) -> list[tuple[float, float]]:
    """[[x, y], ...] as sorted float pairs, skipping malformed entries."""
    if not isinstance(series, (list, tuple)):
        return []
    points = []
    for item in series:
        if isinstance(item, (list, tuple)) and len(item) >= 2:
            x, y = as_number(item[0]), as_number(item[1])
            if x is not None and y is not None:
                points.append((x, y))
    return sorted(points)


def _use_log_scale(values: list[float]) -> bool:
    positive = [v for v in values if v > 0 and math.isfinite(v)]
    return len(positive) == len(values) and bool(positive) and max(positive) / min(positive) > 20


def _line_plot(lines: dict[str, list[list[tuple[float, float]]]], editors: list[str]) -> tuple[Figure, Any]:
    fig = _new_figure()
    ax = fig.add_subplot()
    for i, editor in enumerate(e for e in editors if e in lines):
        for j, pts in enumerate(lines[editor]):
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, marker=".", color=f"C{i % 10}", alpha=0.9,
                    label=safe_label(editor) if j == 0 else "_nolegend_")
    ax.set_xlabel("number of edits")
    ax.grid(alpha=0.3)
    return fig, ax


def plot_ppl_curves(records: list[dict], editors: list[str], collapse_ratio: float | None) -> Figure | None:
    """Perplexity ratio (ppl / ppl before any edit) against number of edits, one colour per editor."""
    lines: dict[str, list] = defaultdict(list)
    for rec in records:
        pts = _points(metric(rec, "ppl_curve"))
        if not pts:
            continue
        at_zero = [y for x, y in pts if x == 0]
        base = at_zero[0] if at_zero else as_number(metric(rec, "ppl_before")) or pts[0][1]
        if base and base > 0:
            lines[editor_of(rec)].append([(x, y / base) for x, y in pts])
    if not lines:
        return None
    fig, ax = _line_plot(lines, editors)
    if collapse_ratio:
        ax.axhline(collapse_ratio, color="crimson", linestyle="--", linewidth=1,
                   label=f"collapse threshold (x{collapse_ratio:g})")
    values = [y for curves in lines.values() for pts in curves for _, y in pts]
    if _use_log_scale(values + ([collapse_ratio] if collapse_ratio else [])):
        ax.set_yscale("log")
    ax.set_ylabel("perplexity / perplexity before editing")
    ax.legend(fontsize=8)
    return fig


def plot_downstream_vs_ppl(records: list[dict], editors: list[str]) -> Figure | None:
    """Downstream suite's correlation records: accuracy per task against perplexity, one line per (editor, task)."""
    lines = []
    for rec in records:
        series = metric(rec, "downstream_series")
        if not isinstance(series, list) or not series:
            continue
        tasks = sorted({k for row in series if isinstance(row, dict) for k in row} - {"n_edits", "ppl"})
        for task in tasks:
            pts = [(as_number(row.get("ppl")), as_number(row.get(task))) for row in series if isinstance(row, dict)]
            pts = [(x, y) for x, y in pts if x is not None and y is not None and math.isfinite(x) and x > 0]
            if pts:
                rho = as_number(metric(rec, f"ppl_downstream_spearman_{task}"))
                label = f"{editor_of(rec)}: {task}" + (f" (rho {rho:+.2f})" if rho is not None else "")
                lines.append((safe_label(label), pts))
    if not lines:
        return None
    fig = _new_figure()
    ax = fig.add_subplot()
    for i, (label, pts) in enumerate(lines):
        xs, ys = zip(*pts, strict=True)
        ax.plot(xs, ys, marker="o", color=f"C{i % 10}", label=label)
    if _use_log_scale([x for _, pts in lines for x, _ in pts]):
        ax.set_xscale("log")
    ax.set_xlabel("perplexity")
    ax.set_ylabel("downstream accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def plot_series(records: list[dict], editors: list[str], name: str, ylabel: str) -> Figure | None:
    """A per-record series metric ([[n_edits, value], ...]) against number of edits."""
    lines: dict[str, list] = defaultdict(list)
    for rec in records:
        pts = _points(metric(rec, name))
        if pts:
            lines[editor_of(rec)].append(pts)
    if not lines:
        return None
    fig, ax = _line_plot(lines, editors)
    if _use_log_scale([y for curves in lines.values() for pts in curves for _, y in pts]):
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    return fig


def plot_timings(records: list[dict], editors: list[str]) -> Figure | None:
    """Stacked bars of mean seconds per phase, one bar per (editor, suite) so that a sequential
    run's long edit phase is not averaged with single edits."""
    phases = ordered_phases(k for r in records for k in timings(r))
    suites = list(dict.fromkeys(suite_of(r) for r in records))
    bars: dict[tuple[str, str], list[float]] = {}
    for editor in editors:
        for suite in suites:
            recs = [r for r in records if editor_of(r) == editor and suite_of(r) == suite]
            means = [mean(timings(r).get(p) for r in recs) or 0.0 for p in phases]
            if any(means):
                bars[(editor, suite)] = means
    if not bars:
        return None
    fig = _new_figure(width=min(14.0, max(4.5, 0.9 * len(bars) + 3)))
    ax = fig.add_subplot()
    x = np.arange(len(bars))
    bottom = np.zeros(len(bars))
    for k, phase in enumerate(phases):
        heights = np.array([means[k] for means in bars.values()])
        if heights.any():
            ax.bar(x, heights, bottom=bottom, label=safe_label(phase), color=f"C{k % 10}", width=0.6)
            bottom += heights
    ax.set_xticks(x, [f"{safe_label(e)}\n{safe_label(s)}" for e, s in bars], fontsize=8)
    ax.set_ylabel("mean seconds per record")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, title="phase", title_fontsize=8)
    return fig


def _box_with_points(ax: Any, groups: dict[str, list[float]]) -> None:
    """Box per editor with the individual values as jittered dots."""
    labels = list(groups)
    ax.boxplot([groups[e] for e in labels], widths=0.5, showfliers=False)
    rng = np.random.default_rng(0)
    for i, editor in enumerate(labels, start=1):
        values = groups[editor]
        ax.scatter(i + rng.uniform(-0.12, 0.12, len(values)), values, s=10, alpha=0.6, color=f"C{(i - 1) % 10}")
    ax.set_xticks(range(1, len(labels) + 1), [safe_label(e) for e in labels])
    ax.grid(axis="y", alpha=0.3)


def _values_by_editor(records: list[dict], editors: list[str], name: str) -> dict[str, list[float]]:
    groups = {}
    for editor in editors:
        values = [as_number(metric(r, name)) for r in records if editor_of(r) == editor]
        values = [v for v in values if v is not None and math.isfinite(v)]
        if values:
            groups[editor] = values
    return groups


def plot_ppl_ratio(records: list[dict], editors: list[str], collapse_ratio: float | None) -> Figure | None:
    """Box plot of per-record ppl_ratio per editor."""
    groups = _values_by_editor(records, editors, "ppl_ratio")
    if not groups:
        return None
    fig = _new_figure(width=max(4.5, 1.2 * len(groups) + 3))
    ax = fig.add_subplot()
    _box_with_points(ax, groups)
    if collapse_ratio:
        ax.axhline(collapse_ratio, color="crimson", linestyle="--", linewidth=1,
                   label=f"collapse threshold (x{collapse_ratio:g})")
        ax.legend(fontsize=8)
    if _use_log_scale([v for vs in groups.values() for v in vs]):
        ax.set_yscale("log")
    ax.set_ylabel("ppl_after / ppl_before")
    return fig


def plot_scores(records: list[dict], editors: list[str]) -> Figure | None:
    """One panel per score metric (efficacy, generalization, locality) with a box per editor."""
    panels = {m: g for m in SCORE_METRICS if (g := _values_by_editor(records, editors, m))}
    if not panels:
        return None
    n_editors = max(len(g) for g in panels.values())
    fig = _new_figure(width=max(5.0, len(panels) * (1.0 * n_editors + 1.5)), height=3.4)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, groups) in zip(axes, panels.items(), strict=True):
        _box_with_points(ax, groups)
        ax.set_title(f"{KEY_METRICS[name]} ({name})", fontsize=9)
        values = [v for vs in groups.values() for v in vs]
        if all(0.0 <= v <= 1.0 for v in values):
            ax.set_ylim(-0.05, 1.05)
    return fig


# --------------------------------------------------------------------------- localization (tracing suite)


def plot_tracing_heatmap(records: list[dict]) -> Figure | None:
    """Average tracing effect per (kind, layer) over the tracing suite's per-fact records (metric tracing_effect,
    a dict kind -> [effect per layer])."""
    sums: dict[str, list[list[float]]] = defaultdict(list)
    for rec in records:
        effects = metric(rec, "tracing_effect")
        if suite_of(rec) != "tracing" or not isinstance(effects, dict):
            continue
        for kind, row in effects.items():
            vals = [as_number(v) for v in row] if isinstance(row, list) else []
            if vals and all(v is not None for v in vals):
                sums[str(kind)].append(vals)
    kinds = [k for k in ("hidden", "mlp", "attn") if sums.get(k)] + sorted(k for k in sums if k not in
                                                                          ("hidden", "mlp", "attn"))
    if not kinds or len({len(r) for k in kinds for r in sums[k]}) != 1:
        return None
    grid = np.array([np.mean(np.array(sums[k]), axis=0) for k in kinds])          # [kinds, layers]
    fig = _new_figure(7.0, 1.0 + 0.6 * len(kinds))
    ax = fig.add_subplot()
    image = ax.imshow(grid, aspect="auto", cmap="Purples", interpolation="nearest")
    ax.set_yticks(range(len(kinds)))
    ax.set_yticklabels([f"{safe_label(k)} (n={len(sums[k])})" for k in kinds])
    ax.set_xlabel("layer (centre of the restored window)")
    fig.colorbar(image, ax=ax, label="mean effect")
    return fig


def plot_layer_sweep(records: list[dict]) -> Figure | None:
    """Edit success and tracing effect against the edited layer, one line per layer-sweep record."""
    lines = []
    for rec in records:
        layers, success, tracing = (metric(rec, k) for k in ("layers", "edit_success", "tracing_effect"))
        if not (isinstance(layers, list) and isinstance(success, list) and len(layers) == len(success) > 0):
            continue
        r2t, r2l = as_number(metric(rec, "r2_tracing")), as_number(metric(rec, "r2_layer"))
        label = f"{editor_of(rec)} w{metric(rec, 'window')}"
        if r2t is not None and r2l is not None:
            label += f" (R2 tracing {r2t:.2f}, layer {r2l:.2f})"
        lines.append((safe_label(label), layers, success, tracing if isinstance(tracing, list) else None))
    if not lines:
        return None
    fig = _new_figure()
    ax = fig.add_subplot()
    for i, (label, layers, success, tracing) in enumerate(lines):
        ax.plot(layers, [as_number(v) for v in success], marker="o", color=f"C{i % 10}", label=label)
        if tracing and len(tracing) == len(layers):
            ax.plot(layers, [as_number(v) for v in tracing], linestyle="--", color=f"C{i % 10}")
    ax.set_xlabel("edited layer (window centre)")
    ax.set_ylabel("edit success / tracing effect")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig
