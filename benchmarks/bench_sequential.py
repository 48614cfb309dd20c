"""How the cost of sequential editing grows with the number of edits N, per editor, on a real model (default: the
embedded SmolLM2-135M).

    python benchmarks/bench_sequential.py [--editors rome r_rome memit alphaedit d4s emmet] [--n 16]
                                          [--data-dir ../shared/data] [--json out.json] [--plot out.png]

One stream of N edits per editor, no restore in between (what the sequential suite does). Per edit it times the
editor call alone (CUDA events on a GPU, wall clock on CPU); at N = 1, 2, 4, ... it also times the "final"
protocol, re-scoring every edit made so far, and the perplexity. The per-edit time should stay flat for every
editor (editors that carry state across edits, AlphaEdit's key cache and D4S's sums, keep it fixed-size), while the
re-scoring at the end grows linearly with N. An edit's time varies with its case, since the v* / z optimisation
stops early once the target is reached; seconds per optimisation step are printed beside it and do not depend on N.
"""
from __future__ import annotations

import argparse
import json
import statistics

import numpy as np
import torch

from harness.metrics import counterfact_metrics
from harness.models.snapshot import WeightSnapshot
from harness.sequential import schedule_points
from harness.session import HarnessSession, Options
from harness.timing import PhaseTimer


def run_editor(h: HarnessSession, name: str, n: int, reverse: bool = False) -> dict:
    lm, cases = h.lm, h.cases(limit=n)
    cases = cases[::-1] if reverse else cases
    editor = h.editor(name)
    original = WeightSnapshot(lm.model, editor.edited_parameters(lm))
    checkpoints = set(schedule_points(len(cases), "geometric")) | {len(cases)}
    steps, points, opt_steps = [], [], []
    try:
        for i, case in enumerate(cases, start=1):
            timer = PhaseTimer(lm.device)
            with timer.phase("edit"):
                edit = editor.apply(lm, [case])
            steps.append(timer.seconds["edit"])
            v = edit.info.get("v_steps")            # optimisation steps (v* / z early-stops per case)
            opt_steps.append(sum(v) if isinstance(v, list) else v)
            if i in checkpoints:
                with timer.phase("rescore"):
                    eff = [counterfact_metrics(lm.model, lm.tokenizer, c)["efficacy_success"] for c in cases[:i]]
                with timer.phase("perplexity"):
                    ppl = h.perplexity().mean_ppl
                points.append({"n_edits": i, "edit_s": timer.seconds["edit"],
                               "cumulative_edit_s": sum(steps), "rescore_s": timer.seconds["rescore"],
                               "rescore_s_per_edit": timer.seconds["rescore"] / i,
                               "perplexity_s": timer.seconds["perplexity"], "ppl": ppl,
                               "efficacy_final": statistics.fmean(eff)})
    finally:
        original.restore()
        editor.reset()
    per_step = [t / n for t, n in zip(steps, opt_steps) if n]   # seconds per optimisation step: case-independent
    # the slope leaves out edit 1, which pays first-call costs (allocator, lazily loaded statistics)
    later = steps[1:] if len(steps) > 2 else steps
    slope = float(np.polyfit(np.arange(len(later)), later, 1)[0]) if len(later) > 1 else 0.0
    return {"editor": name, "order": "reverse" if reverse else "forward", "case_ids": [c.case_id for c in cases],
            "edit_s": steps, "opt_steps": opt_steps, "s_per_opt_step": per_step, "points": points,
            "edit_s_mean": statistics.fmean(later),
            "edit_slope_pct_per_edit": 100 * slope / statistics.fmean(later)}


def plot(results: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        a.plot(range(1, len(r["edit_s"]) + 1), r["edit_s"], marker=".", label=f"{r['editor']} ({r['order']})")
        b.plot([p["n_edits"] for p in r["points"]], [p["rescore_s"] for p in r["points"]], marker="o",
               label=f"{r['editor']} ({r['order']})")
    a.set(xlabel="edit number", ylabel="seconds for this edit", title="per-edit cost", ylim=(0, None))
    b.set(xlabel="edits so far (N)", ylabel="seconds", title="re-scoring all N edits (final protocol)")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--editors", nargs="+", default=["rome", "r_rome", "memit", "alphaedit", "d4s", "emmet"])
    ap.add_argument("--n", type=int, default=16, help="edits per editor")
    ap.add_argument("--dataset", default="builtin")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--hparam", action="append", default=[])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--reverse", action="store_true",
                    help="also run each stream in reverse order and compare each case's time late vs early")
    ap.add_argument("--json", default=None, help="write the measurements here")
    ap.add_argument("--plot", default=None, help="write a PNG of per-edit and re-scoring cost here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    h = HarnessSession(Options(editors=args.editors, model=args.model, device=args.device, data_dir=args.data_dir,
                               dataset=args.dataset, n_cases=args.n, hparams=args.hparam, progress=False))
    print(f"model {args.model} on {h.lm.device}, {torch.get_num_threads()} threads; base perplexity "
          f"{h.base_perplexity().mean_ppl:.2f} ({h.ppl_corpus_name()})", flush=True)
    results = []
    position_effect = {}
    for name in args.editors:
        results.append(run_editor(h, name, args.n))
        r = results[-1]
        print(f"{name}: {len(r['edit_s'])} edits, mean {r['edit_s_mean']:.2f} s/edit, "
              f"slope {r['edit_slope_pct_per_edit']:+.2f} %/edit; s per edit: "
              f"{' '.join(f'{t:.1f}' for t in r['edit_s'])}; optimisation steps: {r['opt_steps']}; s per step: "
              f"{' '.join(f'{t:.2f}' for t in r['s_per_opt_step'])}", flush=True)
        if args.reverse:
            # the same edits in reverse order: each case's time late in the stream against early in it
            rev = run_editor(h, name, args.n, reverse=True)
            results.append(rev)
            fwd_t, rev_t = dict(zip(r["case_ids"], r["edit_s"])), dict(zip(rev["case_ids"], rev["edit_s"]))
            n = len(r["case_ids"])
            # ratio = time at the later position / time at the earlier one; edits 1 (warm-up) left out
            ratios = [(rev_t[c] / fwd_t[c]) if i < n // 2 else (fwd_t[c] / rev_t[c])
                      for i, c in enumerate(r["case_ids"]) if i not in (0, n - 1) and i != (n - 1) / 2]
            position_effect[name] = statistics.fmean(ratios)
            print(f"{name}: same case late in the stream / early in it: mean time ratio "
                  f"{position_effect[name]:.3f} over {len(ratios)} cases", flush=True)
    print("\n| editor | N | edit s (edit N) | cumulative edit s | re-score all N s | re-score s/edit | ppl | "
          "final ES |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        for p in r["points"]:
            print(f"| {r['editor']} ({r['order']}) | {p['n_edits']} | {p['edit_s']:.2f} | {p['cumulative_edit_s']:.1f} | "
                  f"{p['rescore_s']:.2f} | {p['rescore_s_per_edit']:.3f} | {p['ppl']:.1f} | "
                  f"{p['efficacy_final']:.2f} |")
    print("\n| editor | mean s/edit (edits 2..N) | slope of s/edit vs edit number (edits 2..N) |")
    print("|---|---|---|")
    for r in results:
        print(f"| {r['editor']} ({r['order']}) | {r['edit_s_mean']:.2f} | {r['edit_slope_pct_per_edit']:+.2f} % per edit |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": h.lm.identity, "machine": h.machine(), "n": args.n, "results": results,
                       "position_effect": position_effect}, f,
                      indent=1, default=str)
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
