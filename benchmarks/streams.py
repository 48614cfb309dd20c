"""The long-stream table and curves (docs/results.md, "1,000 sequential edits") from the run JSONs of sequential
runs: one row per stream with what it cost.

    python benchmarks/streams.py reports/stream1000-*/latest.json [--plot docs/streams-1000.png] [--json out.json]

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


def _ci(m: dict, name: str) -> str:
    value, ci = m.get(f"{name}_final"), (m.get("final_ci") or {}).get(name)
    return f"{_f(value)} [{_f(ci[0])}, {_f(ci[1])}]" if ci and None not in ci else _f(value)


def row(run: dict, rec: dict) -> dict:
    m, t, info = rec["metrics"], rec.get("timings") or {}, rec.get("info") or {}
    n = m["n_edits"]
    probe = [(a, b) for (_, a), (_, b) in zip(m.get("probe_tf_efficacy") or [], m.get("probe_wild_efficacy") or [])]
    return {
        "editor": rec["editor"], "n_edits": n, "batch_size": info.get("batch_size"),
        "ppl_curve": m["ppl_curve"], "ppl_ratio": m["ppl_ratio"], "edits_to_collapse": m["edits_to_collapse"],
        "es_immediate": m["efficacy_immediate"], "es_final": _ci(m, "efficacy"), "ps_final": _ci(m, "paraphrase"),
        "ns_final": _ci(m, "neighborhood"), "norm_growth": m.get("norm_growth"),
        "probe_last": probe[-1] if probe else None,
        "s_per_edit": {k: v / n for k, v in t.items() if isinstance(v, (int, float))},
        "peak_rss_gb": (rec.get("memory") or {}).get("peak_rss_mb", 0) / 1024,
        "resumed_from": info.get("resumed_from"), "run_id": run.get("run_id"),
    }


def _points(row: dict) -> list[int]:
    """The scheduled perplexity points shown: the first at or after 1, 10 and 100 edits, and the last."""
    ns = [int(n) for n, _ in row["ppl_curve"] if n > 0]
    return sorted({min(n for n in ns if n >= k) for k in (1, 10, 100) if any(n >= k for n in ns)} | {ns[-1]})


def markdown(rows: list[dict]) -> str:
    shown = _points(rows[0]) if rows else []
    head = (f"| editor | batch | perplexity ratio after {' / '.join(f'{n:,}' for n in shown)} edits | edits to "
            "collapse (x2) | ES "
            "immediate / final | PS final | NS final | norm growth | probe at the end: TF / WILD | s / edit: edit "
            "+ evaluate + ppl + probe + final = total | peak RSS |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        base = r["ppl_curve"][0][1]
        at = {int(n): p / base for n, p in r["ppl_curve"]}
        s = r["s_per_edit"]
        parts = [s.get(k, 0.0) for k in ("edit", "evaluate", "perplexity", "probe", "evaluate_final")]
        probe = f"{_f(r['probe_last'][0])} / {_f(r['probe_last'][1])}" if r["probe_last"] else "-"
        lines.append(" | ".join([
            f"| {r['editor']}", str(r["batch_size"]), " / ".join(f"{at[n]:.3f}" if n in at else "-" for n in shown),
            str(r["edits_to_collapse"] or "none"), f"{_f(r['es_immediate'])} / {r['es_final']}", r["ps_final"],
            r["ns_final"], "n/a" if r["norm_growth"] is None else f"x{r['norm_growth']:.3f}", probe,
            " + ".join(f"{x:.2f}" for x in parts) + f" = {sum(s.values()):.2f}", f"{r['peak_rss_gb']:.2f} GB |"]))
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
    args = ap.parse_args(argv)
    records = stream_records(args.runs)
    rows = [row(run, rec) for run, rec in records]
    print(markdown(rows), end="")
    if args.plot:
        plot(records, args.plot)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
