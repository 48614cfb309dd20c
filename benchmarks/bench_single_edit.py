"""Speed and memory of the single-edit cycle per editor on a real model (default: the embedded SmolLM2-135M).

    python benchmarks/bench_single_edit.py [--editors rome memit ft] [--cases 5] [--data-dir ../shared/data]

Prints, per editor: seconds per case for edit, evaluation (pre + post CounterFact scoring) and perplexity, restore
milliseconds, ROME-style scores, and the process's peak RSS; plus key-statistics time (cold and cached) and the
one-off base perplexity. Same work as the reference ROME's cycle (shared/REFERENCE.md), so the two compare.
"""
from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

from harness import protocols
from harness.editing import edited
from harness.session import HarnessSession, Options
from harness.timing import PhaseTimer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--editors", nargs="+", default=["rome", "memit", "ft"])
    ap.add_argument("--cases", type=int, default=5)
    ap.add_argument("--dataset", default="auto", help="auto: CounterFact with --data-dir, else builtin")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--hparam", action="append", default=[])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--per-case", action="store_true", help="print one line per case")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    h = HarnessSession(Options(editors=args.editors, model=args.model, data_dir=args.data_dir,
                               dataset=args.dataset, n_cases=args.cases, hparams=args.hparam, progress=False))
    t0 = time.perf_counter()
    lm = h.lm
    print(f"model {args.model}: loaded in {time.perf_counter() - t0:.1f} s ({lm.identity['n_params'] / 1e6:.0f}M "
          f"params, {torch.get_num_threads()} threads)")
    t0 = time.perf_counter()
    base = h.base_perplexity()
    print(f"base perplexity ({h.ppl_corpus_name()}, {len(h.ppl_texts())} texts): {base.mean_ppl:.2f} "
          f"in {time.perf_counter() - t0:.2f} s (once per session)")
    cases = h.cases()
    rows = []
    for name in args.editors:
        editor = h.editor(name)
        layers = editor.hparams.layers if hasattr(editor.hparams, "layers") else [editor.hparams.layer]
        t0 = time.perf_counter()
        h.stats.second_moments(layers)
        stats_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        type(h.stats)(lm, lambda: [], h.stats.corpus_name, h.stats.n_tokens, h.cache_dir).second_moments(layers)
        cached_s = time.perf_counter() - t0
        per = {"edit": [], "evaluate": [], "perplexity": [], "restore": []}
        es, ps, ns, ratio = [], [], [], []
        for case in cases:
            timer = PhaseTimer(lm.device)
            with timer.phase("evaluate"):
                protocols.counterfact(h, case)
            with edited(h.lm, editor, [case], timer) as edit:
                with timer.phase("evaluate"):
                    post = protocols.counterfact(h, case, edit)
                with timer.phase("perplexity"):
                    ppl = h.perplexity()
            for k in per:
                per[k].append(timer.seconds[k])
            if args.per_case:
                print(f"  {name} {case.case_id} {case.subject!r}: ES {post['efficacy_success']:.0f} "
                      f"PS {post['paraphrase_success']:.2f} NS {post['neighborhood_success']:.2f} "
                      f"ppl x{ppl.mean_ppl / base.mean_ppl:.3f} edit {timer.seconds['edit']:.1f}s "
                      f"v_loss {edit.info.get('v_loss', [None])[-1]}", flush=True)
            es.append(post["efficacy_success"]), ps.append(post["paraphrase_success"])
            ns.append(post["neighborhood_success"]), ratio.append(ppl.mean_ppl / base.mean_ppl)
        m = {k: statistics.fmean(v) for k, v in per.items()}
        rows.append((name, len(cases), m["edit"], m["evaluate"], m["perplexity"], 1000 * m["restore"],
                     m["edit"] + m["evaluate"] + m["perplexity"] + m["restore"], statistics.fmean(es),
                     statistics.fmean(ps), statistics.fmean(ns), max(ratio), stats_s, cached_s))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print()
    print("| editor | cases | edit s | evaluate s | perplexity s | restore ms | cycle s/case | ES | PS | NS "
          "| max ppl ratio | key stats s (first) | key stats s (cached) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print("| {} | {} | {:.2f} | {:.2f} | {:.2f} | {:.1f} | {:.2f} | {:.2f} | {:.2f} | {:.2f} | {:.3f} | {:.1f} | "
              "{:.2f} |".format(*r))
    print(f"\npeak RSS of the process: {peak:.0f} MB")


if __name__ == "__main__":
    main()
