"""Self-contained HTML report for one run: tables from a Jinja2 template, plots as inline SVG.

Plots are drawn with matplotlib on an explicit Agg canvas (``FigureCanvasAgg``) through the
object-oriented ``Figure`` API, so no GUI backend is touched and pyplot's global state (and any
backend the caller chose) is left alone. Only editor, metric and phase names reach plot labels,
and those are reduced to a safe character set first.

Layout for a paper or a PR: failures first, then one summary table per suite (every headline metric of the
registry as mean [95% bootstrap interval], column tooltips from the registry), the plots (perplexity axes zoomed
to the data or log-scaled, integer edit counts, legends beside the axes, one panel per score with its mean and
interval), the per-record tables (failed records first), and the provenance. Tables sort by a click on a header
and filter from a box above them: one static inline script, with no run data in it.

Fitted to a 1280 px screen: a record's failure message sits in a row of its own under the record, as wide as the
visible part of the table (not in a narrow last column that made a failed row hundreds of pixels tall); metric
names in headers may break after ``_`` and ``.``; a table still wider than the page scrolls sideways inside its
own box, with its first column held in place and the cut edge faded, and the page itself never scrolls sideways.
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
from matplotlib.ticker import MaxNLocator, ScalarFormatter

from harness.metrics.registry import (
    FAILED_OUTCOMES,
    REGISTRY,
    GroupSummary,
    aggregate,
    headline_metrics,
    metric_spec,
)
from harness.report import (
    as_number,
    editor_of,
    editors_of,
    fmt,
    fmt_aggregate,
    is_skipped,
    metric,
    model_name,
    ordered_phases,
    run_groups,
    suite_of,
    template_env,
    timings,
)

SUMMARY_PHASES = ("edit", "evaluate", "perplexity")
_SVG_RC = {"svg.fonttype": "path", "svg.hashsalt": "harness-report", "font.size": 9}


# --------------------------------------------------------------------------- public API


def render_html(run: dict, plots: bool = True) -> str:
    """Render the run as one self-contained HTML document (no external resources; one small inline script that
    sorts and filters the tables, with no data in it)."""
    return template_env().get_template("run.html.j2").render(**build_context(run, plots=plots))


def write_html(run: dict, path: str | Path) -> Path:
    """Render the run and write it to ``path`` atomically (parent folders are created); return the path."""
    from harness.run import atomic_write_text

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(out, render_html(run))


# --------------------------------------------------------------------------- template context


def build_context(run: dict, plots: bool = True) -> dict:
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
            "hparams": _pretty_json(config.get("hparams") or config.get("hparam_overrides")),
            "argv": " ".join(str(a) for a in config.get("argv") or []),
        },
        "provenance": provenance_context(run.get("provenance")),
        "summaries": summary_tables(run_groups(run)),
        "failures": [_record_row(r, []) for r in records if r.get("outcome") in FAILED_OUTCOMES],
        "plots": build_plots(records, editors, as_number(thresholds.get("collapse_ppl_ratio"))) if plots else [],
        "suites": suite_tables(records),
    }


def _items(mapping: Any) -> list[tuple[str, Any]]:
    return [(str(k), v) for k, v in mapping.items()] if isinstance(mapping, dict) else []


def _pretty_json(value: Any) -> str | None:
    return json.dumps(value, indent=2, sort_keys=True, default=str) if value else None


def _column(name: str) -> dict:
    """A table column; ``name_parts``/``label_parts`` are the text split after each ``_`` and ``.``, so that the
    template can offer a line break there (``<wbr>``) and a long metric name does not widen its column."""
    spec = metric_spec(name)
    return {"name": name, "label": spec.display, "tooltip": spec.tooltip,
            "name_parts": _break_points(name), "label_parts": _break_points(spec.display)}


def _break_points(text: str) -> list[str]:
    return [part for part in re.split(r"(?<=[_.])", str(text)) if part] or [""]


def summary_tables(groups: list[GroupSummary]) -> list[dict]:
    """One table per suite: a row per editor with counts, each headline metric (value and 95% interval) and the
    median seconds of the main phases."""
    by_suite: dict[str, list[GroupSummary]] = defaultdict(list)
    for g in groups:
        by_suite[g.suite].append(g)
    tables = []
    for suite, members in by_suite.items():
        names = {n for g in members for n in g.metrics}
        columns = headline_metrics(names) + [f"timings.{p}" for p in SUMMARY_PHASES if f"timings.{p}" in names]
        rows = [{"editor": g.editor, "n": g.n, "passed": g.passed, "failed": g.failed, "skipped": g.skipped,
                 "cells": [(fmt_aggregate(g.metrics.get(c), None, 4),
                            g.metrics[c].value if c in g.metrics else None) for c in columns]}
                for g in members]
        tables.append({"suite": suite, "columns": [_column(c) for c in columns], "rows": rows})
    return tables


def provenance_context(prov: Any) -> dict | None:
    """The provenance section: harness version and commit, dataset, corpora, seeds and per-editor hyper-parameters
    with their files (None for schema 1 runs, which had none)."""
    if not isinstance(prov, dict):
        return None
    dataset = prov.get("dataset") if isinstance(prov.get("dataset"), dict) else {}
    editors = prov.get("editors") if isinstance(prov.get("editors"), dict) else {}
    corpora = prov.get("corpora") if isinstance(prov.get("corpora"), dict) else {}
    return {
        "error": prov.get("error"),
        "harness": _items(prov.get("harness")),
        "dataset": [(k, v) for k, v in _items(dataset) if k != "case_ids"],
        "case_ids": ", ".join(str(c) for c in dataset.get("case_ids") or []),
        "corpora": [(role, _items(entry)) for role, entry in corpora.items()],
        "seeds": _items(prov.get("seeds")),
        "editors": [{"name": str(name),
                     "files": [(f.get("path"), f.get("sha256")) for f in (e.get("files") or []) if isinstance(f, dict)],
                     "overrides": _pretty_json(e.get("overrides")), "error": e.get("error"),
                     "hparams": _pretty_json(e.get("hparams"))}
                    for name, e in editors.items() if isinstance(e, dict)],
    }


def suite_tables(records: list[dict]) -> list[dict]:
    """One table per suite (in order of appearance), failed records first, with a column per scalar metric."""
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
        columns = sorted(scalars, key=REGISTRY.order)
        ordered = sorted(recs, key=lambda r: r.get("outcome") not in FAILED_OUTCOMES)
        tables.append({
            "suite": suite,
            "columns": [_column(c) for c in columns],
            "rows": [_record_row(r, columns) for r in ordered],
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
        "cells": [(fmt(metric(rec, c)), as_number(metric(rec, c))) for c in columns],
        "time": sum(n for n in map(as_number, timings(rec).values()) if n is not None) or None,
        "message": message,
        "message_head": message.strip().splitlines()[0] if message and message.strip() else message,
    }


# --------------------------------------------------------------------------- plots


def build_plots(records: list[dict], editors: list[str], collapse_ratio: float | None) -> list[dict]:
    """All plots whose data is present, each as {"title", "caption", "svg"}."""
    active = [r for r in records if not is_skipped(r)]
    single = [r for r in active if not metric(r, "ppl_curve")]
    makers = [
        ("Perplexity vs number of edits", "Perplexity relative to the unedited model along each sequential-editing "
         "run (log scale when it spans more than 20x); the dashed line, or the note when it is off the axis, is the "
         "collapse threshold.",
         lambda: plot_ppl_curves(active, editors, collapse_ratio)),
        ("Perplexity ratio per edit", "ppl_after / ppl_before per single-edit record (dots; box per editor), axis "
         "zoomed to the data (log scale beyond 20x); the collapse threshold is drawn when in view, else noted.",
         lambda: plot_ppl_ratio(single, editors, collapse_ratio)),
        ("Edited-layer weights: mean |W|", "Mean absolute value of the (first) edited weight matrix after each "
         "number of edits of a sequential run (metric norm_l1).",
         lambda: plot_series(active, editors, "norm_l1", "mean |W| of the edited weight")),
        ("Past edits: teacher-forced vs in the wild", "The Mirage probe (--probe-every K): a random sample of the "
         "edits made so far, re-scored every K edits of a sequential run, teacher-forced (solid: P(new) > P(true)) "
         "and generated greedily to a natural stop (dashed: the answer contains the new target).",
         lambda: plot_probe(active, editors)),
        ("Downstream accuracy vs perplexity", "Accuracy per downstream task against perplexity at each state of "
         "a sequential run (base model, then after each edit); the legend gives the Spearman correlation.",
         lambda: plot_downstream_vs_ppl(active, editors)),
        *[(f"Distribution: {metric_spec(name).display} ({name})",
           f"{metric_spec(name).description}. Dots are records; the black bar is the mean with its 95% bootstrap "
           "interval over cases.", (lambda name=name: plot_score_panel(single, editors, name)))
          for name in score_panel_metrics(single)],
        ("Target diversity: accuracy and edited-layer norm along each stream", "Diversity suite: the accuracy of "
         "every edit made so far (left) and the edited layers' L1 norm relative to the unedited model (right) "
         "against the number of edits; one colour per editor, one line style per edit set (docs/diversity.md).",
         lambda: plot_diversity(active, editors)),
        ("Target diversity: decline against the diversity of the targets",
         ("Diversity suite: after the last edit of each stream, 1 - the accuracy of all edits (left), the "
          "perplexity ratio (middle) and the edited layers' L1 norm growth (right) against the entropy of the set's "
          "targets (bits); one colour per editor, sets of one editor and stream length joined. The D4S paper "
          "predicts rising lines (docs/diversity.md)."),
         lambda: plot_diversity_decline(active, editors)),
        ("Time per phase", "Median seconds per test record, stacked by phase, per editor and suite.",
         lambda: plot_timings(active, editors)),
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
            plots.append({"title": title, "caption": caption, "svg": figure_to_svg(fig, f"plot{len(plots)}"),
                          "panel": title.startswith("Distribution: ")})
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


def _new_figure(width: float = 6.2, height: float = 3.4) -> Figure:
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


def _legend_outside(ax: Any, **kw: Any) -> None:
    """The legend to the right of the axes, never over the data."""
    handles, _ = ax.get_legend_handles_labels()
    if handles:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, fontsize=8, frameon=False, **kw)


def _threshold(ax: Any, value: float | None, values: list[float]) -> None:
    """The collapse threshold: a dashed line when it lies within (or near) the data, else a note at the top or
    bottom edge, so that the axis stays zoomed on the data."""
    if not value:
        return
    lo, hi = min(values), max(values)
    if ax.get_yscale() == "log" or lo <= value <= hi * 1.15:
        ax.axhline(value, color="crimson", linestyle="--", linewidth=1, label=f"collapse threshold x{value:g}")
    else:
        where, y = ("above", 0.98) if value > hi else ("below", 0.02)
        ax.text(0.99, y, f"collapse threshold x{value:g} {where} the axis", transform=ax.transAxes, ha="right",
                va="top" if where == "above" else "bottom", fontsize=8, color="crimson")


def _zoom(ax: Any, values: list[float]) -> None:
    """Log scale beyond a 20x range; else limits padded around the data, with enough decimals that 0.998 and
    1.008 read differently."""
    if _use_log_scale(values):
        ax.set_yscale("log")
        return
    lo, hi = min(values), max(values)
    pad = max((hi - lo) * 0.1, abs(hi) * 0.002, 1e-6)
    ax.set_ylim(lo - pad, hi + pad)
    ax.yaxis.set_major_formatter(ScalarFormatter(useOffset=False))    # 1.008, not "+1" and 0.008


def _line_plot(lines: dict[str, list[list[tuple[float, float]]]], editors: list[str]) -> tuple[Figure, Any]:
    fig = _new_figure()
    ax = fig.add_subplot()
    for i, editor in enumerate(e for e in editors if e in lines):
        for j, pts in enumerate(lines[editor]):
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, marker=".", color=f"C{i % 10}", alpha=0.9,
                    label=safe_label(editor) if j == 0 else "_nolegend_")
    ax.set_xlabel("number of edits")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
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
    values = [y for curves in lines.values() for pts in curves for _, y in pts if math.isfinite(y)]
    _zoom(ax, values or [1.0])
    _threshold(ax, collapse_ratio, values or [1.0])
    ax.set_ylabel("perplexity / perplexity before editing")
    _legend_outside(ax)
    return fig


def plot_probe(records: list[dict], editors: list[str]) -> Figure | None:
    """The Mirage probe's two efficacy curves per sequential record: teacher-forced (solid), WILD (dashed)."""
    curves = []
    for rec in records:
        tf, wild = _points(metric(rec, "probe_tf_efficacy")), _points(metric(rec, "probe_wild_efficacy"))
        if tf or wild:
            curves.append((editor_of(rec), tf, wild))
    if not curves:
        return None
    fig = _new_figure()
    ax = fig.add_subplot()
    colour = {e: f"C{i % 10}" for i, e in enumerate(e for e in editors)}
    seen = set()
    for editor, tf, wild in curves:
        for pts, style, kind in ((tf, "-", "TF"), (wild, "--", "WILD")):
            if pts:
                xs, ys = zip(*pts, strict=True)
                label = safe_label(f"{editor}-{kind}")
                ax.plot(xs, ys, style, marker=".", color=colour.get(editor, "C0"),
                        label=label if label not in seen else "_nolegend_")
                seen.add(label)
    ax.set_xlabel("number of edits")
    ax.set_ylabel("efficacy of sampled past edits")
    ax.set_ylim(-0.03, 1.03)
    ax.grid(alpha=0.3)
    _legend_outside(ax)
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
    _legend_outside(ax)
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
    _zoom(ax, [y for curves in lines.values() for pts in curves for _, y in pts if math.isfinite(y)] or [0.0])
    ax.set_ylabel(ylabel)
    _legend_outside(ax)
    return fig


def plot_timings(records: list[dict], editors: list[str]) -> Figure | None:
    """Stacked bars of median seconds per phase, one bar per (editor, suite) so that a sequential run's long
    edit phase is not pooled with single edits."""
    phases = ordered_phases(k for r in records for k in timings(r))
    suites = list(dict.fromkeys(suite_of(r) for r in records))
    bars: dict[tuple[str, str], list[float]] = {}
    for editor in editors:
        for suite in suites:
            recs = [r for r in records if editor_of(r) == editor and suite_of(r) == suite]
            medians = [aggregate([timings(r).get(p) for r in recs], "median").value or 0.0 for p in phases]
            if any(medians):
                bars[(editor, suite)] = medians
    if not bars:
        return None
    fig = _new_figure(width=min(14.0, max(5.5, 0.9 * len(bars) + 4)))
    ax = fig.add_subplot()
    x = np.arange(len(bars))
    bottom = np.zeros(len(bars))
    for k, phase in enumerate(phases):
        heights = np.array([values[k] for values in bars.values()])
        if heights.any():
            ax.bar(x, heights, bottom=bottom, label=safe_label(phase), color=f"C{k % 10}", width=0.6)
            bottom += heights
    ax.set_xticks(x, [f"{safe_label(e)}\n{safe_label(s)}" for e, s in bars], fontsize=8)
    ax.set_ylabel("median seconds per record")
    ax.grid(axis="y", alpha=0.3)
    _legend_outside(ax, title="phase", title_fontsize=8)
    return fig


def _box_with_points(ax: Any, groups: dict[str, list[float]], mean_ci: bool = False) -> None:
    """Box per editor with the individual values as jittered dots (and the mean with its bootstrap interval)."""
    labels = list(groups)
    ax.boxplot([groups[e] for e in labels], widths=0.5, showfliers=False)
    rng = np.random.default_rng(0)
    for i, editor in enumerate(labels, start=1):
        values = groups[editor]
        ax.scatter(i + rng.uniform(-0.12, 0.12, len(values)), values, s=12, alpha=0.6, color=f"C{(i - 1) % 10}")
        if mean_ci:
            agg = aggregate(values)
            if agg.value is not None and agg.low is not None:
                ax.errorbar(i + 0.32, agg.value, yerr=[[agg.value - agg.low], [agg.high - agg.value]], fmt="o",
                            color="black", markersize=4, capsize=3, linewidth=1.2)
    ax.set_xticks(range(1, len(labels) + 1), [safe_label(e) for e in labels])
    ax.set_xlim(0.4, len(labels) + 0.7)
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
    """Per-record ppl_ratio per editor, the axis zoomed to the data."""
    groups = _values_by_editor(records, editors, "ppl_ratio")
    if not groups:
        return None
    fig = _new_figure(width=max(5.0, 1.2 * len(groups) + 3.5))
    ax = fig.add_subplot()
    _box_with_points(ax, groups, mean_ci=True)
    values = [v for vs in groups.values() for v in vs]
    _zoom(ax, values)
    _threshold(ax, collapse_ratio, values)
    ax.set_ylabel("ppl_after / ppl_before")
    _legend_outside(ax)
    return fig


def score_panel_metrics(records: list[dict]) -> list[str]:
    """Headline metrics with a direction and a bounded unit (fractions, scores) that the records carry: one
    distribution panel each."""
    names = {n for r in records for n in (r.get("metrics") or {})}
    return [n for n in headline_metrics(names)
            if metric_spec(n).higher_is_better is not None and metric_spec(n).unit in ("fraction", "score")]


def plot_score_panel(records: list[dict], editors: list[str], name: str) -> Figure | None:
    """One score's per-record values per editor (dots, box, mean with its 95% interval)."""
    groups = _values_by_editor(records, editors, name)
    if not groups:
        return None
    fig = _new_figure(width=max(3.4, 0.9 * len(groups) + 1.8), height=2.8)
    ax = fig.add_subplot()
    _box_with_points(ax, groups, mean_ci=True)
    values = [v for vs in groups.values() for v in vs]
    if all(0.0 <= v <= 1.0 for v in values):
        ax.set_ylim(-0.05, 1.05)
    ax.set_ylabel(metric_spec(name).display)
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
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    _legend_outside(ax)
    return fig


# --------------------------------------------------------------------------- target diversity (diversity suite)

_SET_STYLES = {"yesno": ":", "choice": "-.", "few": "--", "distinct": "-"}


def plot_diversity(records: list[dict], editors: list[str]) -> Figure | None:
    """Diversity suite records: efficacy_curve and l1_growth_curve against edits, per (editor, set)."""
    recs = [r for r in records if suite_of(r) == "diversity" and _points(metric(r, "efficacy_curve"))]
    if not recs:
        return None
    fig = _new_figure(10.0, 3.8)
    left, right = fig.subplots(1, 2)
    colours = {e: f"C{i % 10}" for i, e in enumerate(editors)}
    for rec in recs:
        kind = (rec.get("info") or {}).get("diversity_set") or rec.get("case_id")
        style = {"color": colours.get(editor_of(rec), "grey"), "linestyle": _SET_STYLES.get(kind, "-"),
                 "marker": ".", "label": safe_label(f"{editor_of(rec)} {kind}")}
        for ax, name in ((left, "efficacy_curve"), (right, "l1_growth_curve")):
            pts = _points(metric(rec, name))
            if pts:
                ax.plot(*zip(*pts, strict=True), **style)
    left.set(xlabel="number of edits", ylabel="accuracy of the edits so far", ylim=(-0.05, 1.05))
    right.set(xlabel="number of edits", ylabel="L1 norm / L1 norm before editing")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    _legend_outside(right)
    return fig


_DECLINE_PANELS = (("efficacy_final", "1 - accuracy of all edits"), ("ppl_ratio", "perplexity ratio"),
                   ("norm_growth", "L1 norm growth"))


def plot_diversity_decline(records: list[dict], editors: list[str]) -> Figure | None:
    """Diversity suite records: each stream's decline after its last edit against its set's target entropy, one
    line per (editor, number of edits) over the sets."""
    groups: dict[tuple[str, Any], list[tuple[float, dict]]] = defaultdict(list)
    for rec in records:
        if suite_of(rec) != "diversity":
            continue
        x = as_number(metric(rec, "target_entropy"))
        if x is not None:
            groups[(editor_of(rec), metric(rec, "n_edits"))].append((x, rec))
    if not groups:
        return None
    fig = _new_figure(12.0, 3.6)
    axes = fig.subplots(1, len(_DECLINE_PANELS))
    colours = {e: f"C{i % 10}" for i, e in enumerate(editors)}
    for (editor, n), pts in sorted(groups.items(), key=lambda kv: (str(kv[0][0]), str(kv[0][1]))):
        pts.sort(key=lambda p: p[0])
        label = safe_label(f"{editor}_N{n}" if n is not None else editor)
        for ax, (name, _) in zip(axes, _DECLINE_PANELS, strict=True):
            xy = [(x, as_number(metric(r, name))) for x, r in pts]
            xy = [(x, 1.0 - y if name == "efficacy_final" else y) for x, y in xy if y is not None]
            if xy:
                ax.plot(*zip(*xy, strict=True), color=colours.get(editor, "grey"), marker="o", label=label)
    for ax, (_, ylabel) in zip(axes, _DECLINE_PANELS, strict=True):
        ax.set(xlabel="target entropy (bits)", ylabel=ylabel)
        ax.grid(alpha=0.3)
    _legend_outside(axes[-1])
    return fig
