"""Teacher-forced against WILD efficacy, and generation fluency around a collapsing edit (docs/wild.md's numbers).

    python benchmarks/bench_wild.py --data-dir ../shared/data [--editors rome memit ft] [--cases 10]
                                    [--hard BP] [--out reports/wild/bench.json]

For each editor and each of the first N QAEdit and CounterFact cases, the WILD suite's protocol
(``harness.protocols.wild``): edit, then score the edit prompt and its paraphrases teacher-forced (EasyEdit's token
accuracy; CounterFact's probability comparison too) and in the wild (greedy generation, natural stop, exact match /
containment), plus WILD locality against the unedited model's generations; restore. Then for the hard case(s) the
single-edit protocol (fluency and consistency from the case's generation prompts, ME-PPL_50 perplexity) and fluency
on unrelated prompts, before and after each editor's edit. Prints markdown tables and writes every per-case record
(with the generated answers) to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from statistics import fmean
from typing import Any

import torch

from harness import protocols
from harness.data import load_cases
from harness.editing import edited
from harness.metrics.generation import generation_metrics
from harness.session import HarnessSession, Options
from harness.timing import PhaseTimer

def _log(path: Path, row: dict[str, Any]) -> None:
    """Append one record to the JSON-lines log (a long run keeps what it measured if it is stopped)."""
    with path.open("a") as f:
        f.write(json.dumps(row, default=str) + "\n")


def efficacy_rows(h: HarnessSession, editors: list[str], sets: dict[str, list], log: Path) -> list[dict[str, Any]]:
    """The WILD suite's protocol per (set, editor, case): teacher-forced and WILD scores side by side. Case i of
    every set and editor comes before case i + 1, so a run stopped early has the same cases for every editor."""
    rows = []
    for i in range(max(len(c) for c in sets.values())):
        for set_name, cases in sets.items():
            for name in editors:
                if i >= len(cases):
                    continue
                case, timer = cases[i], PhaseTimer(h.lm.device)
                m = protocols.wild(h, h.editor(name), case, timer)
                rows.append({"set": set_name, "editor": name, "case_id": case.case_id, **m.metrics,
                             "answers": m.info["wild_answers"], "seconds": dict(timer.seconds)})
                r = rows[-1]
                _log(log, r)
                t = " ".join(f"{k} {v:.0f}s" for k, v in r["seconds"].items())
                print(f"  {set_name} {name} {case.case_id}: TF {r['rewrite_acc']:.2f} WILD em "
                      f"{r['wild_rewrite_em']:.0f} contains {r['wild_rewrite_contains']:.0f} "
                      f"answer {r['answers']['rewrite'][0]!r} ({t})", flush=True)
    return rows


def fluency_rows(h: HarnessSession, editors: list[str], hard: list, unrelated: list[str], log: Path
                 ) -> list[dict[str, Any]]:
    """The single-edit protocol on each hard case (fluency and consistency from the case's own generation
    prompts, perplexity), plus fluency on ``unrelated`` prompts before and after the same edit."""
    lm, rows = h.lm, []
    for case in hard:
        other_pre, _ = generation_metrics(lm.model, lm.tokenizer, case, prefixes=unrelated)
        for name in editors:
            m = protocols.single_edit(h, h.editor(name), case, PhaseTimer(lm.device))
            with edited(lm, h.editor(name), [case]):
                other, texts = generation_metrics(lm.model, lm.tokenizer, case, prefixes=unrelated)
            rows.append({"case_id": case.case_id, "subject": case.subject, "editor": name, **m.metrics,
                         "fluency_unrelated_pre": other_pre["fluency"], "fluency_unrelated": other["fluency"],
                         "text": m.info.get("generated_text"), "text_unrelated": texts[0][:300]})
            _log(log, rows[-1])
            print(f"  {case.subject} {name}: fluency {m.metrics['fluency_pre']:.2f} -> {m.metrics['fluency']:.2f}, "
                  f"unrelated {other_pre['fluency']:.2f} -> {other['fluency']:.2f}, ppl x{m.metrics['ppl_ratio']:.1f}; "
                  f"{texts[0][:100]!r}", flush=True)
    return rows


def _m(rows, key) -> str:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return f"{fmean(vals):.2f}" if vals else "-"


def print_tables(eff: list[dict], flu: list[dict]) -> None:
    print("\n| set | editor | TF rewrite acc | TF rephrase acc | ES (prob.) | WILD rewrite EM | WILD rewrite "
          "contains | WILD rephrase EM | WILD rephrase contains | WILD locality | WILD contains before edit |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for key in dict.fromkeys((r["set"], r["editor"]) for r in eff):
        rs = [r for r in eff if (r["set"], r["editor"]) == key]
        print(f"| {key[0]} | {key[1]} | {_m(rs, 'rewrite_acc')} | {_m(rs, 'rephrase_acc')} | "
              f"{_m(rs, 'efficacy_success')} | {_m(rs, 'wild_rewrite_em')} | {_m(rs, 'wild_rewrite_contains')} | "
              f"{_m(rs, 'wild_rephrase_em')} | {_m(rs, 'wild_rephrase_contains')} | {_m(rs, 'wild_locality')} | "
              f"{_m(rs, 'wild_rewrite_contains_pre')} |")
    print("\n| hard case | editor | fluency (own prompts) | fluency (unrelated prompts) | consistency | ME-PPL |")
    print("|---|---|---|---|---|---|")
    for r in flu:
        print(f"| {r['subject']} | {r['editor']} | {r['fluency_pre']:.2f} -> {r['fluency']:.2f} | "
              f"{r['fluency_unrelated_pre']:.2f} -> {r['fluency_unrelated']:.2f} | "
              f"{r['consistency_pre']:.3f} -> {r['consistency']:.3f} | "
              f"{r['ppl_before']:.1f} -> {r['ppl_after']:.1f} (x{r['ppl_ratio']:.1f}) |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--editors", nargs="+", default=["rome", "memit", "ft"])
    ap.add_argument("--cases", type=int, default=10)
    ap.add_argument("--sets", nargs="*", default=["qaedit", "counterfact"])
    ap.add_argument("--hard", nargs="*", default=["BP"], help="subjects of built-in hard cases for fluency")
    ap.add_argument("--unrelated", type=int, default=10, help="unrelated generation prompts for fluency")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", default="reports/wild/bench.json")
    args = ap.parse_args()
    h = HarnessSession(Options(editors=args.editors, model=args.model, data_dir=args.data_dir, progress=False))
    sets = {s: load_cases(s, data_dir=args.data_dir, limit=args.cases) for s in args.sets}
    t0 = time.perf_counter()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.with_suffix(".jsonl")
    log.write_text("")
    hard = [c for c in load_cases("builtin-hard") if c.subject in args.hard]
    # unrelated prompts: the generation prompts of CounterFact records, one per record, from the end of the sample
    unrelated = [c.generation_prompts[0] for c in load_cases("counterfact", data_dir=args.data_dir)[-args.unrelated:]]
    flu = fluency_rows(h, args.editors, hard, unrelated, log) if hard else []     # the short part first
    eff = efficacy_rows(h, args.editors, sets, log)
    print_tables(eff, flu)
    out.write_text(json.dumps({"efficacy": eff, "fluency": flu, "threads": torch.get_num_threads(),
                               "seconds": time.perf_counter() - t0}, indent=1, default=str))
    print(f"\n{len(eff)} edits + {len(flu)} hard edits in {time.perf_counter() - t0:.0f} s; records in {out}")


if __name__ == "__main__":
    main()
