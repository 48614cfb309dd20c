"""The D4S paper's two findings on a real model (default: the embedded SmolLM2-135M), outside pytest: every
editor runs each target-diversity set (harness.data.diversity) as one sequential stream, measured as the diversity
suite does (harness.protocols.diversity.decline_stream), one JSON line per (editor, set) appended to ``--out`` as
soon as the stream ends, then per editor the diversity-decline correlations across sets.

    OMP_NUM_THREADS=1 python benchmarks/bench_diversity.py --editors rome memit alphaedit d4s --n 20 \\
        --data-dir ../shared/data --ppl-schedule every:5 --out reports/diversity/bench.jsonl

A line already in ``--out`` for the same (editor, set, n, dataset) is not run again, so an interrupted
measurement continues where it stopped.

    python benchmarks/bench_diversity.py --summarise 10 --rows reports/diversity/bench-n10.jsonl \
        reports/diversity/bench-n20.jsonl

prints the values after N edits of every stream of N or more edits as markdown (the first N edits of a longer
stream are the N-edit stream: the sets are prefixes of each other, the editors deterministic), and per editor the
correlation of target diversity with the decline across sets.

    python benchmarks/bench_diversity.py --html reports/diversity/bench.html --rows reports/diversity/bench-n20.jsonl

writes the rows as the harness's HTML run report (the diversity suite's plots and tables; no model is loaded).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from harness.data.diversity import KINDS, load_diversity_sets
from harness.metrics.decline import diversity_decline
from harness.metrics.norms import correlation
from harness.protocols.diversity import decline_stream
from harness.session import HarnessSession, Options
from harness.timing import PhaseTimer

SUMMARY = ("n_edits", "target_entropy", "target_nll", "efficacy_immediate", "efficacy_final", "ppl_ratio",
           "norm_growth", "norm_efficacy_spearman", "norm_efficacy_pearson")


def _done(out: Path) -> dict[tuple, dict]:
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()] if out.exists() else []
    return {(r["editor"], r["set"], r["n_edits"], r["dataset"]): r for r in rows}


def _value_at(curve: list, n: int) -> float | None:
    return next((v for x, v in curve if x == n), None)


def _immediate(row: dict, journals: Path, case_ids: list[str]) -> list[float] | None:
    """Each edit's efficacy right after it was made: from the row, else from the stream's journal (rows written
    before ``efficacy_immediate_each`` existed)."""
    if row.get("efficacy_immediate_each"):
        return row["efficacy_immediate_each"]
    for path in sorted(journals.glob(f"{row['editor']}-*.jsonl")):
        steps = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if [c for s in steps for c in s["case_ids"]][:len(case_ids)] == case_ids:
            return [v for s in steps for v in s["efficacy"]]
    return None


def at_n(row: dict, n: int, dset, immediate: list[float] | None, nll: float) -> dict:
    """A stream's values after its first ``n`` edits (``dset``: the ``n``-edit set, a prefix of the stream's)."""
    eff, l1 = row["efficacy_curve"], row["l1_curve"]
    pts = [(v, _value_at(eff, x)) for x, v in l1 if 0 < x <= n]
    c = correlation([a for a, _ in pts], [b for _, b in pts])
    imm = sum(immediate[:n]) / n if immediate and len(immediate) >= n else None
    final = _value_at(eff, n)
    return {"editor": row["editor"], "set": row["set"], "n_edits": n,
            "target_entropy": dset.diversity().target_entropy, "target_nll": nll,
            "ppl_ratio": _value_at(row["ppl_ratio_curve"], n), "efficacy_immediate": imm, "efficacy_final": final,
            "efficacy_decline": imm - final if imm is not None and final is not None else None,
            "norm_growth": _value_at(row["l1_growth_curve"], n),
            "norm_efficacy_spearman": c.spearman, "norm_efficacy_pearson": c.pearson}


def fmt(v: object) -> str:
    return "-" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)


def summarise(paths: list[str], n: int, data_dir: str | None, model: str | None) -> None:
    from harness.metrics.decline import target_nll

    rows = [{**json.loads(line), "_path": p} for p in paths for line in Path(p).read_text().splitlines()
            if line.strip()]
    rows = [r for r in rows if r["n_edits"] >= n]
    sets = {d: load_diversity_sets(d, n, data_dir=data_dir, skip_invalid=True) for d in {r["dataset"] for r in rows}}
    lm = HarnessSession(Options(progress=False, **({"model": model} if model else {}))).lm
    nll = {(d, k): target_nll(lm.model, lm.tokenizer, list(s.cases)) for d, fam in sets.items() for k, s in fam.items()}
    table = []
    for r in rows:
        dset = sets[r["dataset"]][r["set"]]
        imm = _immediate(r, Path(r["_path"]).parent / "journal", [c.case_id for c in dset.cases])
        table.append(at_n(r, n, dset, imm, nll[(r["dataset"], r["set"])]))
    table.sort(key=lambda t: (t["editor"], KINDS.index(t["set"])))
    cols = list(table[0]) if table else []
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for t in table:
        print("| " + " | ".join(fmt(t[c]) for c in cols) + " |")
    for name in dict.fromkeys(t["editor"] for t in table):
        mine = [t for t in table if t["editor"] == name]
        if len(mine) >= 3:
            d = diversity_decline(mine)
            print(name, {k: fmt(v) for k, v in d.items()})


def rows_as_run(paths: list[str]) -> dict:
    """JSONL rows of this script as a run dict the HTML report reads: one diversity-suite record per stream."""
    rows = [json.loads(line) for p in paths for line in Path(p).read_text().splitlines() if line.strip()]
    records = [{"suite": "diversity", "editor": r["editor"], "case_id": r["set"], "outcome": "passed",
                "nodeid": f"benchmarks/bench_diversity.py::{r['editor']}[{r['dataset']}-{r['set']}-{r['n_edits']}]",
                "info": {"diversity_set": r["set"], "dataset": r["dataset"]},
                "metrics": {k: v for k, v in r.items() if k not in ("editor", "set", "dataset", "seconds")}}
               for r in rows]
    return {"run_id": "bench-diversity", "config": {"editors": list(dict.fromkeys(r["editor"] for r in rows)),
                                                    "dataset": ", ".join(sorted({r["dataset"] for r in rows}))},
            "records": records}


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
    ap.add_argument("--summarise", type=int, metavar="N", help="print the values after N edits of --rows and exit")
    ap.add_argument("--rows", nargs="+", default=[], help="JSONL files of earlier runs, for --summarise / --html")
    ap.add_argument("--html", metavar="PATH", help="write --rows (default --out) as an HTML report and exit")
    a = ap.parse_args()
    if a.html:
        from harness.report.html import write_html

        print(write_html(rows_as_run(a.rows or [a.out]), a.html))
        return
    if a.summarise:
        summarise(a.rows or [a.out], a.summarise, a.data_dir, a.model)
        return

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
