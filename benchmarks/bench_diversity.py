"""The D4S paper's two findings on a real model (default: the embedded SmolLM2-135M), outside pytest: every
editor runs each target-diversity set (harness.data.diversity) as one sequential stream, measured as the diversity
suite does (harness.protocols.diversity.decline_stream), one JSON line per (editor, set) appended to ``--out`` as
soon as the stream ends, then per editor the diversity-decline correlations across sets.

    OMP_NUM_THREADS=1 python benchmarks/bench_diversity.py --editors rome memit alphaedit d4s --n 20 \\
        --data-dir ../shared/data --ppl-schedule every:5 --out reports/diversity/bench.jsonl

A line already in ``--out`` for the same (editor, set, n, dataset) is not run again, so an interrupted
measurement continues where it stopped.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from harness.data.diversity import KINDS, load_diversity_sets
from harness.metrics.decline import diversity_decline
from harness.protocols.diversity import decline_stream
from harness.session import HarnessSession, Options
from harness.timing import PhaseTimer

SUMMARY = ("n_edits", "target_entropy", "target_nll", "efficacy_immediate", "efficacy_final", "ppl_ratio",
           "norm_growth", "norm_efficacy_spearman", "norm_efficacy_pearson")


def _done(out: Path) -> dict[tuple, dict]:
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()] if out.exists() else []
    return {(r["editor"], r["set"], r["n_edits"], r["dataset"]): r for r in rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--editors", nargs="+", default=["rome", "memit", "alphaedit", "d4s"])
    ap.add_argument("--sets", nargs="+", default=list(KINDS), choices=KINDS)
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--dataset", default="builtin")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--model", default=None)
    ap.add_argument("--ppl-schedule", default="every:5")
    ap.add_argument("--hparam", action="append", default=[])
    ap.add_argument("--out", default="reports/diversity/bench.jsonl")
    a = ap.parse_args()

    o = Options(data_dir=a.data_dir, hparams=a.hparam, progress=False)
    if a.model:
        o.model = a.model
    h = HarnessSession(o)
    sets = load_diversity_sets(a.dataset, a.n, data_dir=a.data_dir, kinds=a.sets, skip_invalid=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    ppl_base = h.base_perplexity().mean_ppl
    for name in a.editors:
        for kind, dset in sets.items():
            if (name, kind, a.n, a.dataset) in _done(out):
                continue
            t0, timer = time.perf_counter(), PhaseTimer(h.lm.device)
            stream = decline_stream(h.lm, h.editor(name), list(dset.cases), perplexity=lambda: h.perplexity().mean_ppl,
                                    ppl_base=ppl_base, journal_dir=out.parent / "journal", timer=timer,
                                    ppl_schedule=a.ppl_schedule)
            row = {"editor": name, "set": kind, "dataset": a.dataset, **dset.diversity(h.lm.tokenizer).to_dict(),
                   **stream.metrics(), "seconds": timer.seconds, "wall_s": time.perf_counter() - t0}
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(" ".join(f"{k}={row[k]:.4g}" if isinstance(row[k], float) else f"{k}={row[k]}"
                           for k in ("editor", "set", *SUMMARY, "wall_s")), flush=True)
    rows = _done(out)
    for name in a.editors:
        mine = [r for (e, _, n, d), r in rows.items() if e == name and n == a.n and d == a.dataset]
        if len(mine) > 2:
            print(name, json.dumps(diversity_decline(mine)), flush=True)


if __name__ == "__main__":
    main()
