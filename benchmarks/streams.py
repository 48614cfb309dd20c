"""The long-stream table and curves (docs/results.md, "1,000 sequential edits") from the run JSONs of sequential
runs: one row per stream with what it cost.

    python benchmarks/streams.py reports/stream1000-*/latest.json [--plot docs/streams-1000.png] [--json out.json]
    python benchmarks/streams.py benchmarks/results/streams/*-1000.json --readme      # the README's summary

Each run JSON's sequential record gives the perplexity curve, edits to collapse, immediate and final efficacy (the
final scores with their 95% bootstrap interval over the stream's edits), norm growth, the Mirage probe's teacher-
forced and WILD efficacy of sampled past edits, seconds per edit by phase and the process's peak RSS. The plot has
three panels against the number of edits: perplexity / perplexity before, the probe's two efficacies (solid:
teacher-forced, dashed: WILD) and the edited layers' mean |W| relative to the unedited model.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def stream_records(paths: list[str]) -> list[tuple[dict, dict]]:
    """(run, record) of every sequential record in the given run JSONs, in the order given."""
    out = []
    for p in paths:
        run = json.loads(Path(p).read_text())
        out += [(run, r) for r in run["records"] if r.get("suite") == "sequential" and r.get("metrics")]
    return out


def _f(x, digits: int = 2) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def _ci(m: dict, name: str, digits: int = 3) -> str:
    value, ci = m.get(f"{name}_final"), (m.get("final_ci") or {}).get(name)
    if not ci or None in ci:
        return _f(value, digits)
    return f"{_f(value, digits)} [{_f(ci[0], digits)}, {_f(ci[1], digits)}]"


PROBE = ("probe_tf_efficacy", "probe_tf_acc", "probe_wild_efficacy", "probe_wild_em")


def row(run: dict, rec: dict) -> dict:
    m, t, info = rec["metrics"], rec.get("timings") or {}, rec.get("info") or {}
    n = m["n_edits"]
    probe = list(zip(*[[v for _, v in m.get(k) or []] for k in PROBE]))    # (TF, TF acc, WILD, WILD exact) per point
    return {
        "editor": rec["editor"], "n_edits": n, "batch_size": info.get("batch_size"),
        "ppl_curve": m["ppl_curve"], "ppl_ratio": m["ppl_ratio"], "edits_to_collapse": m["edits_to_collapse"],
        "es_immediate": m["efficacy_immediate"], "es_final": _ci(m, "efficacy"), "ps_final": _ci(m, "paraphrase"),
        "ns_final": _ci(m, "neighborhood"), "norm_growth": m.get("norm_growth"),
        "es_final_value": m.get("efficacy_final"), "ps_final_value": m.get("paraphrase_final"),
        "ns_final_value": m.get("neighborhood_final"),
        "probe_last": probe[-1] if probe else None,
        "s_per_edit": _per_edit(t, n, _resumed_edits(info, n)),
        "peak_rss_gb": (rec.get("memory") or {}).get("peak_rss_mb", 0) / 1024,
        "resumed_from": info.get("resumed_from"), "run_id": run.get("run_id"),
    }


def _resumed_edits(info: dict, n: int) -> int:
    """Edits made before this process. ``resumed_from`` counts journal steps (editor calls, ``batch_size`` edits
    each); records from before ``resumed_edits`` existed have only that."""
    if "resumed_edits" in info:
        return int(info["resumed_edits"])
    return min(int(info.get("resumed_from") or 0) * int(info.get("batch_size") or 1), n)


def _per_edit(timings: dict, n: int, resumed_edits: int) -> dict[str, float]:
    """Seconds per edit by phase. A resumed run's timer saw only the edits made after its first ``resumed_edits``,
    so the per-edit phases are divided by those; the final re-scoring (and restore) covered the whole stream."""
    made = max(n - resumed_edits, 1)
    return {k: v / (n if k in ("evaluate_final", "restore") else made)
            for k, v in timings.items() if isinstance(v, (int, float))}


SHOWN = (0, 100, 200, 300, 600, 1000)     # perplexity points in the table: the batch-100 streams' schedule


def _ppl(r: dict) -> str:
    """Perplexity at the shown points (- where the stream's schedule has no point there) and the final ratio."""
    at = {int(n): p for n, p in r["ppl_curve"]}
    last = max(at)
    cells = [f"{at[n]:.1f}" if n in at else "-" for n in SHOWN if n <= last]
    if last not in SHOWN:
        cells.append(f"{at[last]:.1f} (after {last:,})")
    return " / ".join(cells) + f" (x{r['ppl_ratio']:.3f})"


def _probe(r: dict) -> str:
    last = r["probe_last"]
    return " / ".join(_f(x) for x in last) if last else "-"


def _norm(r: dict) -> str:
    return "n/a" if r["norm_growth"] is None else f"x{r['norm_growth']:.3f}"


def _seconds(r: dict) -> str:
    s = r["s_per_edit"]
    parts = [s.get(k, 0.0) for k in PHASES]
    return " + ".join(f"{x:.2f}" for x in parts) + f" = {sum(parts):.2f}"


PHASES = ("edit", "evaluate", "perplexity", "probe", "evaluate_final")


def markdown(rows: list[dict]) -> str:
    """docs/results.md's table: one row per stream, every column."""
    head = ("| editor | batch | perplexity after " + " / ".join(f"{n:,}" for n in SHOWN) + " edits (ratio) | edits "
            "to collapse (x2) | ES immediate / final [95% CI] | PS final | NS final | norm growth | Mirage probe at "
            "the end: TF / TF acc / WILD contains / WILD exact | s / edit: edit + evaluate + ppl + probe + final = "
            "total | peak RSS |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(" | ".join([
            f"| {r['editor']}", str(r["batch_size"]), _ppl(r), str(r["edits_to_collapse"] or "none"),
            f"{_f(r['es_immediate'], 3)} / {r['es_final']}", r["ps_final"], r["ns_final"], _norm(r), _probe(r),
            _seconds(r), f"{r['peak_rss_gb']:.2f} GB |"]))
    return "\n".join(lines) + "\n"


def readme(rows: list[dict]) -> str:
    """The README's summary: one line per editor."""
    head = ("| editor (batch) | perplexity after 1,000 edits | edits to collapse (x2) | ES final | PS final | NS final "
            "| norm growth | past edits at 1,000: teacher-forced / generated | s / edit |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        probe = f"{_f(r['probe_last'][0])} / {_f(r['probe_last'][2])}" if r["probe_last"] else "-"
        lines.append(" | ".join([
            f"| {r['editor']} ({r['batch_size']})", f"x{r['ppl_ratio']:.3f}", str(r["edits_to_collapse"] or "none"),
            _f(r["es_final_value"]), _f(r["ps_final_value"]), _f(r["ns_final_value"]), _norm(r), probe,
            f"{sum(r['s_per_edit'].get(k, 0.0) for k in PHASES):.2f} |"]))
    return "\n".join(lines) + "\n"


def plot(records: list[tuple[dict, dict]], out: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for i, (_, rec) in enumerate(records):
        m, colour, label = rec["metrics"], f"C{i % 10}", rec["editor"]
        base = m["ppl_curve"][0][1]
        xs, ys = zip(*[(n, p / base) for n, p in m["ppl_curve"] if n > 0])
        axes[0].plot(xs, ys, marker=".", color=colour, label=label)
        for name, style in (("probe_tf_efficacy", "-"), ("probe_wild_efficacy", "--")):
            if m.get(name):
                px, py = zip(*m[name])
                axes[1].plot(px, py, style, marker=".", color=colour,
                             label=f"{label} {'TF' if 'tf' in name else 'WILD'}")
        if m.get("norm_l1"):
            nx, ny = zip(*m["norm_l1"])
            axes[2].plot(nx, [y / ny[0] for y in ny], marker=".", color=colour, label=label)
    axes[0].set(xscale="log", xlabel="edits", ylabel="perplexity / before", title="ME-PPL_50")
    axes[1].set(xlabel="edits", ylabel="efficacy of sampled past edits", ylim=(-0.03, 1.03),
                title="Mirage probe: teacher-forced (solid) vs WILD (dashed)")
    axes[2].set(xlabel="edits", ylabel="mean |W| / after the first batch", title="edited layer's L1 norm")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="run JSONs of sequential runs")
    ap.add_argument("--plot", help="write the three-panel figure here (PNG)")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--readme", action="store_true", help="the README's one-line-per-editor table instead")
    args = ap.parse_args(argv)
    records = stream_records(args.runs)
    rows = [row(run, rec) for run, rec in records]
    print((readme if args.readme else markdown)(rows), end="")
    if args.plot:
        plot(records, args.plot)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
