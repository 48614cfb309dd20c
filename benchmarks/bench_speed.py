"""CPU seconds of the single-edit cycle per case, phase by phase, against the reference ROME and the last run.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/bench_speed.py --data-dir /work/shared/data --cases 5
    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/bench_speed.py --data-dir /work/shared/data --cases 3 --ab

Runs the single-edit suite's own measurement (``protocols.single_edit``: CounterFact before, the edit, CounterFact
after, ME-PPL after, restore) for each case with ROME at the reference settings of shared/REFERENCE.md (layer 5,
key statistics from WikiText with ``--data-dir``), at one thread, and times every phase in CPU seconds of this
process (``time.process_time``: on a shared machine, wall time measures the neighbours). Inside the edit the v*
optimisation is timed separately. One-off work (model load, key statistics, context templates, the unedited
model's perplexity) is reported apart: it is paid once per session, not per case.

Prints the per-case means against the reference ROME (REFERENCE.md's side-by-side table, same machine, one thread)
and against the previous run of this script (read from, then written to, ``--json``; ``--no-save`` leaves it), and
the largest difference of each result (ES, PS, NS, perplexity ratio, update norm) from the previous run's, so a
change of results shows next to a change of speed.

``--vstar K`` times the v* of blocks of K cases one at a time and batched (``optimize_values``), alternating in one
process, and compares the results; ``--vstar K --cycle`` the whole cycle with v* one at a time against K ahead
(``--vstar-batch K``):

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/bench_speed.py --data-dir ../shared/data --cases 4 --vstar 4

``--ab`` runs, per case, the unoptimised cycle (the code paths as before issue 14, ``unoptimised``) and then the
optimised one in the same process, alternating, and prints both with their ratio and the largest result
difference: on a shared machine this ratio is far steadier than two separate runs.

``--flops`` counts the floating-point work of every phase instead of its seconds (GFLOP per case, unoptimised and
optimised), which no neighbour on the machine can change, and the least CPU time that work takes at the rate of
matrix products measured here:

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/bench_speed.py --data-dir ../shared/data --cases 2 --flops
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from harness.timing import PhaseTimer, peak_rss_mb

# REFERENCE.md, "Side by side at one thread": kmeng01/rome on the same model, layer, v* settings and 100k WikiText-2
# tokens; CPU seconds per case, mean of the first 5 records of counterfact_rome_sample500.json
REFERENCE = {"edit": 41.7, "evaluate": 3.0, "perplexity": 8.8, "cycle": 55.6, "peak_rss_mb": 2.29 * 1024}
PHASES = ("edit", "v_star", "evaluate", "perplexity", "restore", "cycle")   # cycle: all of single_edit
RESULTS = ("efficacy_success", "paraphrase_success", "neighborhood_success", "ppl_ratio", "update_norm")
DEFAULT_JSON = Path(__file__).parent / "results" / "speed-cpu.json"


def cpu_timer() -> PhaseTimer:
    """``PhaseTimer`` on CPU seconds of this process (all threads)."""
    return PhaseTimer("cpu", clock=time.process_time)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


@contextlib.contextmanager
def timed_v_star(timer_ref: list):
    """Time every v* optimisation (``common.optimize_values``, through which ``optimize_value`` and the editors'
    ``ValuesAhead`` go) into the current timer."""
    from harness.editors import common
    modules = [m for m in list(sys.modules.values())
               if getattr(m, "__name__", "").startswith("harness.editors") and getattr(m, "optimize_values", None)
               is common.optimize_values]
    original = common.optimize_values

    def wrapped(*a, **k):
        with timer_ref[0].phase("v_star"):
            return original(*a, **k)

    for m in modules:
        m.optimize_values = wrapped
    try:
        yield
    finally:
        for m in modules:
            m.optimize_values = original


@contextlib.contextmanager
def unoptimised():
    """The cycle as it was before issue 14's changes: full forward passes for keys and v*, perplexity in one
    batch of up to 4096 tokens without reusing the blocks below the edit, CounterFact scoring in one batch of up
    to 8192 tokens. For ``--ab``: the same process, model and load, so the ratio is robust on a shared machine."""
    import functools

    from harness import session
    from harness.editors import common
    from harness.metrics import counterfact
    saved = (common.supports_layers_from, common.stop_after, session.perplexity, counterfact.score_targets)
    original_ppl = session.perplexity
    common.supports_layers_from = lambda model, adapter: False
    common.stop_after = lambda module: contextlib.nullcontext()
    session.perplexity = lambda *a, **k: original_ppl(*a, **{**k, "below": None, "max_tokens_per_batch": 4096})
    counterfact.score_targets = functools.partial(saved[3], max_tokens=8192)
    try:
        yield
    finally:
        common.supports_layers_from, common.stop_after, session.perplexity, counterfact.score_targets = saved


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def print_ab(what: str, name_a: str, rows_a: list[dict], name_b: str, rows_b: list[dict],
             unit: str = "CPU seconds") -> None:
    """The phase table (mean per case, a / b) and the largest per-case result difference of two paths."""
    print(f"\n{unit} per case (mean), one thread, {what}")
    print(f"| phase | {name_a} | {name_b} | {name_a} / {name_b} |")
    print("|---|---|---|---|")
    for k in PHASES:
        a, b = statistics.fmean(r[k] for r in rows_a), statistics.fmean(r[k] for r in rows_b)
        print(f"| {k} | {a:.2f} | {b:.2f} | {ratio(a, b)} |")
    print(f"largest absolute difference per case, {name_a} against {name_b}: " + ", ".join(
        f"{k} {max(abs(a[k] - b[k]) for a, b in zip(rows_a, rows_b)):.3g}" for k in RESULTS))


def one_case(h, editor, case, protocols, tag: str = "", clock=time.process_time, scale: float = 1.0) -> dict:
    """One single-edit cycle, timed phase by phase in CPU seconds (or in ``clock``'s unit / ``scale``: GFLOP for
    ``--flops``); the row printed and returned."""
    timer_ref = [PhaseTimer("cpu", clock=lambda: clock() / scale)]
    timer = timer_ref[0]
    with timed_v_star(timer_ref), timer.phase("cycle"):
        m = protocols.single_edit(h, editor, case, timer)
    if m.info.get("v_batch", 1) > 1:         # v* from a batch (--vstar-batch): its share, as the edit phase counts
        spent = timer.seconds.get("v_star", 0.0)          # the whole batch in the edit that ran it, else nothing
        timer.seconds["cycle"] += m.info["v_batch_share_s"] - spent
        timer.seconds["v_star"] = m.info["v_batch_share_s"]
    row = {"case_id": case.case_id, "subject": case.subject,
           **{k: round(timer.seconds.get(k, 0.0), 3) for k in PHASES},
           **{k: m.metrics.get(k, m.info.get(k)) for k in RESULTS}}
    print(f"  {tag}{case.case_id} {case.subject!r}: " + " ".join(f"{k} {row[k]:.2f}" for k in PHASES)
          + f" | ES {row['efficacy_success']:.0f} PS {row['paraphrase_success']:.2f} "
          f"NS {row['neighborhood_success']:.2f} ppl x{row['ppl_ratio']:.6f}", flush=True)
    return row


def both_paths(h, editor, cases, protocols, count_flops: bool = False) -> tuple[list[dict], list[dict]]:
    """Per case the unoptimised cycle and then the optimised one, alternating in this process: their rows, in CPU
    seconds, or with ``count_flops`` in GFLOP as ``torch.utils.flop_counter`` counts them."""
    from torch.utils.flop_counter import FlopCounterMode
    slow, fast = [], []
    for case in cases:
        for rows, path, tag in ((slow, unoptimised, "unoptimised "), (fast, contextlib.nullcontext, "optimised   ")):
            counter = FlopCounterMode(display=False) if count_flops else contextlib.nullcontext()
            unit = {"clock": counter.get_total_flops, "scale": 1e9} if count_flops else {}
            with path(), counter:
                rows.append(one_case(h, editor, case, protocols, tag, **unit))
    return slow, fast


def ab(h, editor, cases, protocols) -> None:
    """--ab: unoptimised then optimised cycle per case, alternating; means, ratio, largest result difference."""
    slow, fast = both_paths(h, editor, cases, protocols)
    print_ab(f"unoptimised and optimised alternating in one process ({len(cases)} cases)",
             "unoptimised", slow, "optimised", fast)
    print(f"peak RSS of the process (both paths): {peak_rss_mb():.0f} MB")


RATE_SHAPE = (110, 576, 1536)     # v* steps' MLP products on the embedded model: [rows, d] @ [d, d_ff]


def matmul_rate(rows: int = RATE_SHAPE[0], d: int = RATE_SHAPE[1], d_ff: int = RATE_SHAPE[2],
                repeats: int = 7) -> float:
    """GFLOP/s of this process's matrix products at the v* steps' shape ([rows, d] @ [d, d_ff], fp32, the MLP's),
    best of ``repeats`` timings of 50 products: the rate the floor below is computed at."""
    a, b = torch.randn(rows, d), torch.randn(d, d_ff)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()
        for _ in range(50):
            a @ b
        best = min(best, time.process_time() - t0)
    return 50 * 2 * rows * d * d_ff / best / 1e9


def flops(h, editor, cases, protocols) -> None:
    """--flops: the floating-point work of every phase (GFLOP per case, matrix products and attention as
    ``torch.utils.flop_counter`` counts them, forward and backward; element-wise work is not counted), for the
    unoptimised cycle and the optimised one. Unlike seconds it does not depend on the machine's load, so it shows
    exactly how much work each optimisation removed, and, at the matrix-product rate measured here, the least CPU
    time the counted work can take at one thread."""
    slow, fast = both_paths(h, editor, cases, protocols, count_flops=True)
    print_ab(f"unoptimised and optimised ({len(cases)} cases)", "unoptimised", slow, "optimised", fast, unit="GFLOP")
    rate = matmul_rate()
    cycle = statistics.fmean(r["cycle"] for r in fast)
    rows, d, d_ff = RATE_SHAPE
    print(f"matrix products at the v* shape ([{rows}, {d}] @ [{d}, {d_ff}], fp32, one thread): {rate:.1f} GFLOP/s now "
          f"(best of 7); the optimised cycle's {cycle:.0f} GFLOP take at least {cycle / rate:.1f} CPU-s at that rate, "
          f"against {REFERENCE['cycle'] / 5:.1f} CPU-s for 5x the reference ROME's cycle")


def vstar_ab(h, editor, cases, k: int) -> None:
    """--vstar K: per block of K cases, their v* one at a time (``optimize_value``) and in one batch
    (``optimize_values``), alternating which goes first block by block, in this process (after an untimed warm-up); CPU seconds per case and the largest difference of the
    results (v* relative, v_init relative, steps)."""
    from harness.editors.common import optimize_value, optimize_values
    lm, hp = h.lm, editor.hparams
    module = (lm.adapter.mlp_name(hp.layer) if hasattr(hp, "layer") else lm.adapter.layer_name(hp.layers[-1]))
    templates, opt = editor.context_templates(lm), hp.value_opt()
    optimize_value(lm, cases[0], module, templates, dataclasses.replace(opt, steps=2))   # warm-up, untimed
    alone_s, batch_s, rel_v, rel_init, same_steps = [], [], [], [], True

    def timed(f):
        t0 = time.process_time()
        out = f()
        return out, time.process_time() - t0

    for s in range(0, len(cases), k):
        block = cases[s:s + k]
        one_by_one = lambda: [optimize_value(lm, c, module, templates, opt) for c in block]  # noqa: E731
        together = lambda: optimize_values(lm, block, module, templates, opt)                # noqa: E731
        if (s // k) % 2 == 0:                # alternate which goes first, block by block
            (alone, ta), (batched, tb) = timed(one_by_one), timed(together)
        else:
            (batched, tb), (alone, ta) = timed(together), timed(one_by_one)
        alone_s.append(ta / len(block))
        batch_s.append(tb / len(block))
        for (va, ia, infa), (vb, ib, infb) in zip(alone, batched):
            rel_v.append(((vb - va).norm() / va.norm()).item())
            rel_init.append(((ib - ia).norm() / ia.norm()).item())
            same_steps &= infa["v_steps"] == infb["v_steps"]
        print(f"  block of {len(block)}: one at a time {alone_s[-1]:.2f}, batched {batch_s[-1]:.2f} CPU-s per case; "
              f"steps {[i['v_steps'] for _, _, i in alone]} / {[i['v_steps'] for _, _, i in batched]}", flush=True)
    a, b = statistics.fmean(alone_s), statistics.fmean(batch_s)
    print(f"\nv* CPU seconds per case (mean of {len(alone_s)} block(s) of up to {k}), one thread, alternating in one "
          f"process: one at a time {a:.2f}, batched {b:.2f}, ratio {ratio(a, b)}")
    print(f"results, batched against one at a time: v* within {max(rel_v):.2g} relative, v_init within "
          f"{max(rel_init):.2g}, the same steps: {same_steps}")


def cycle_ab(h, editor, cases, k: int, protocols) -> None:
    """--vstar K --cycle: the whole single-edit cycle per case with the v* of each block of K optimised ahead at its
    first edit (``--vstar-batch K``), then for the same cases with v* one at a time, block by block."""
    h.plan_single_edits([(editor.name, c) for c in cases] * 2)
    one, ahead = [], []
    for s in range(0, len(cases), k):
        block = cases[s:s + k]
        editor.ahead.batch = k           # batched first: the session's one-off work of a first edit (the perplexity
        ahead += [one_case(h, editor, c, protocols, f"ahead, K={k}    ") for c in block]   # texts' lower blocks)
        editor.ahead.batch = 1           # falls on the batched side
        one += [one_case(h, editor, c, protocols, "one at a time ") for c in block]
    editor.ahead.batch = 1
    print_ab(f"v* one at a time and batched {k} ahead, alternating by block in one process ({len(cases)} cases)",
             "one at a time", one, "batched", ahead)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=5)
    ap.add_argument("--editor", default="rome")
    ap.add_argument("--dataset", default="auto", help="auto: CounterFact with --data-dir, else builtin")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--hparam", action="append", default=None,
                    help="editor hparams (default: rome.layer=5, the reference's layer)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON, help="previous run read from, this run written to")
    ap.add_argument("--no-save", action="store_true", help="do not overwrite --json")
    ap.add_argument("--label", default="", help="a note stored with the run (e.g. 'before')")
    ap.add_argument("--ab", action="store_true",
                    help="per case, the unoptimised cycle (as before issue 14) and then the optimised one, in this "
                         "process: prints both and their ratio, checks equal results; --json is not written")
    ap.add_argument("--vstar", type=int, default=None, metavar="K",
                    help="v* of blocks of K cases one at a time and then batched (optimize_values), alternating in "
                         "this process: CPU-s per case and result differences; --json is not written")
    ap.add_argument("--cycle", action="store_true",
                    help="with --vstar K: the whole single-edit cycle, v* one at a time against K ahead")
    ap.add_argument("--flops", action="store_true",
                    help="per case, the floating-point work (GFLOP) of each phase, unoptimised and optimised, and the "
                         "least CPU time it can take at the matrix-product rate measured here; --json is not written")
    ap.add_argument("--generation", action="store_true",
                    help="also the suite's WILD and fluency generations (off: the reference's cycle has none)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from harness import protocols
    from harness.session import HarnessSession, Options

    hparams = args.hparam if args.hparam is not None else [f"{args.editor}.layer=5"]
    h = HarnessSession(Options(editors=[args.editor], model=args.model, data_dir=args.data_dir, dataset=args.dataset,
                               n_cases=args.cases, hparams=hparams, progress=False,
                               wild=args.generation, fluency=args.generation))
    once = cpu_timer()
    with once.phase("load"):
        lm = h.lm
    with once.phase("base_perplexity"):
        h.base_perplexity()
    with once.phase("prepare"):        # context templates and key statistics (cached on disk after the first run)
        editor = h.editor(args.editor)
    cases = h.cases()
    print(f"{args.model} ({lm.identity['n_params'] / 1e6:.0f}M params), {torch.get_num_threads()} thread(s), "
          f"{len(cases)} cases of {h.dataset_name()}, {args.editor} {' '.join(hparams)}; once per session: "
          + ", ".join(f"{k} {v:.1f}" for k, v in once.seconds.items()) + " CPU-s", flush=True)

    if args.flops:
        return flops(h, editor, cases, protocols)
    if args.vstar and args.cycle:
        return cycle_ab(h, editor, cases, args.vstar, protocols)
    if args.vstar:
        return vstar_ab(h, editor, cases, args.vstar)
    per_case = [] if args.ab else [one_case(h, editor, case, protocols) for case in cases]

    if args.ab:
        return ab(h, editor, cases, protocols)
    mean = {k: statistics.fmean(r[k] for r in per_case) for k in PHASES}
    mean["peak_rss_mb"] = peak_rss_mb()
    previous = json.loads(args.json.read_text()) if args.json.is_file() else None
    prev = (previous or {}).get("mean", {})
    print(f"\nCPU seconds per case (mean of {len(per_case)}), one thread; machine shared, so +-10% is noise")
    print("| phase | reference ROME | previous run | this run | reference / this | previous / this |")
    print("|---|---|---|---|---|---|")
    for k in (*PHASES, "peak_rss_mb"):
        ref, p, now = REFERENCE.get(k), prev.get(k), mean[k]
        fmt = (lambda x: f"{x:.0f} MB") if k == "peak_rss_mb" else (lambda x: f"{x:.2f}")
        print(f"| {k} | {fmt(ref) if ref else '-'} | {fmt(p) if p else '-'} | {fmt(now)} | {ratio(ref, now)} | "
              f"{ratio(p, now)} |")
    if previous:
        same = {r["case_id"]: r for r in previous.get("cases", [])}
        diffs = {k: max((abs(r[k] - same[r["case_id"]][k]) for r in per_case if r["case_id"] in same
                         and r[k] is not None and same[r["case_id"]].get(k) is not None), default=None)
                 for k in RESULTS}
        print(f"results against the previous run ({previous.get('commit')}, {previous.get('label')!r}), largest "
              "absolute difference per case: " + ", ".join(f"{k} {v:.3g}" if v is not None else f"{k} -"
                                                              for k, v in diffs.items()))
    if not args.no_save:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        out = {"label": args.label, "commit": git_commit(), "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "command": " ".join(sys.argv), "machine": platform.processor() or platform.machine(),
               "threads": torch.get_num_threads(), "torch": torch.__version__, "dataset": h.dataset_name(),
               "editor": args.editor, "hparams": hparams, "once": {k: round(v, 2) for k, v in once.seconds.items()},
               "mean": {k: round(v, 3) for k, v in mean.items()}, "reference": REFERENCE, "cases": per_case,
               "previous": {k: previous.get(k) for k in ("label", "commit", "when", "mean")} if previous else None}
        args.json.write_text(json.dumps(out, indent=1) + "\n")
        print(f"written to {args.json}")


if __name__ == "__main__":
    main()
