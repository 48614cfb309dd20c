"""Teacher-forced against WILD efficacy, and generation fluency around a collapsing edit (docs/wild.md's numbers).

    python benchmarks/bench_wild.py --data-dir ../shared/data [--editors rome memit ft] [--cases 10]
                                    [--hard BP] [--out reports/wild/bench.json]

For each editor and each of the first N QAEdit and CounterFact cases: edit, then score the edit prompt and its
paraphrases teacher-forced (EasyEdit's token accuracy; CounterFact's probability comparison too) and in the wild
(greedy generation, natural stop, exact match / containment), plus WILD locality against the unedited model's
generations; restore. Then for the hard case(s): fluency (n-gram entropy of sampled text), TF-IDF consistency and
ME-PPL_50 perplexity before and after each editor's edit. Prints markdown tables and writes every per-case record
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

from harness.data import load_cases
from harness.metrics import counterfact_metrics, perplexity, score_targets
from harness.metrics.generation import counterfact_documents, fit_tfidf, generation_metrics
from harness.metrics.wild import case_generations, case_metrics, generations_record
from harness.session import HarnessSession, Options

TF_KEYS = ("rewrite_acc", "rephrase_acc", "efficacy_success", "paraphrase_success")
WILD_KEYS = ("wild_rewrite_em", "wild_rewrite_contains", "wild_rephrase_em", "wild_rephrase_contains",
             "wild_locality")


def teacher_forced(lm, case) -> dict[str, Any]:
    """EasyEdit's token accuracy on the edit prompt and paraphrases (+ CounterFact's metrics with a true target)."""
    if case.target_true is not None:
        return counterfact_metrics(lm.model, lm.tokenizer, case)
    prompts = [case.rewrite_prompt, *case.paraphrase_prompts]
    acc = [s.token_accuracy for s in score_targets(lm.model, lm.tokenizer, prompts, [case.target_new] * len(prompts))]
    return {"rewrite_acc": acc[0], "rephrase_acc": fmean(acc[1:]) if acc[1:] else None}


def efficacy_rows(h: HarnessSession, editors: list[str], sets: dict[str, list]) -> list[dict[str, Any]]:
    lm, rows = h.lm, []
    for set_name, cases in sets.items():
        pre = {c.case_id: case_generations(lm.model, lm.tokenizer, c) for c in cases}     # unedited, once
        pre_wild = {c.case_id: case_metrics(c, pre[c.case_id]) for c in cases}
        for name in editors:
            editor = h.editor(name)
            for case in cases:
                t0 = time.perf_counter()
                with h.edited(editor, [case]):
                    tf = teacher_forced(lm, case)
                    post = case_generations(lm.model, lm.tokenizer, case)
                    wild = case_metrics(case, post, pre[case.case_id])
                rows.append({"set": set_name, "editor": name, "case_id": case.case_id, **tf, **wild,
                             "pre_wild_rewrite_em": pre_wild[case.case_id]["wild_rewrite_em"],
                             "answers": generations_record(post, 2), "seconds": time.perf_counter() - t0})
                r = rows[-1]
                print(f"  {set_name} {name} {case.case_id}: TF {r['rewrite_acc']:.2f} WILD em "
                      f"{r['wild_rewrite_em']:.0f} contains {r['wild_rewrite_contains']:.0f} "
                      f"answer {r['answers']['rewrite'][0]!r} ({r['seconds']:.0f}s)", flush=True)
    return rows


def fluency_rows(h: HarnessSession, editors: list[str], hard: list, vectorizer, unrelated: list[str]
                 ) -> list[dict[str, Any]]:
    """Fluency from the case's own generation prompts and from ``unrelated`` prompts, and ME-PPL, around each edit."""
    lm, rows = h.lm, []
    texts = h.ppl_texts()
    base_ppl = perplexity(lm.model, lm.tokenizer, texts).mean_ppl

    def measure(case) -> dict[str, Any]:
        own, own_texts = generation_metrics(lm.model, lm.tokenizer, case, vectorizer=vectorizer)
        other, other_texts = generation_metrics(lm.model, lm.tokenizer, case, prefixes=unrelated)
        return {"fluency": own["fluency"], "consistency": own["consistency"], "fluency_unrelated": other["fluency"],
                "text": own_texts[0], "text_unrelated": other_texts[0]}

    for case in hard:
        before = measure(case)
        for name in editors:
            with h.edited(h.editor(name), [case]):
                after = measure(case)
                ppl = perplexity(lm.model, lm.tokenizer, texts).mean_ppl
            rows.append({"case_id": case.case_id, "subject": case.subject, "editor": name, "ppl_before": base_ppl,
                         "ppl_after": ppl, **{f"{k}_before": v for k, v in before.items()},
                         **{f"{k}_after": v for k, v in after.items()}})
            print(f"  {case.subject} {name}: fluency {before['fluency']:.2f} -> {after['fluency']:.2f}, unrelated "
                  f"{before['fluency_unrelated']:.2f} -> {after['fluency_unrelated']:.2f}, ppl {base_ppl:.1f} -> "
                  f"{ppl:.1f}; {after['text_unrelated'][:100]!r}", flush=True)
    return rows


def _m(rows, key) -> str:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return f"{fmean(vals):.2f}" if vals else "-"


def print_tables(eff: list[dict], flu: list[dict]) -> None:
    print("\n| set | editor | TF rewrite acc | TF rephrase acc | ES (prob.) | WILD rewrite EM | WILD rewrite "
          "contains | WILD rephrase EM | WILD rephrase contains | WILD locality | WILD EM before edit |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for key in dict.fromkeys((r["set"], r["editor"]) for r in eff):
        rs = [r for r in eff if (r["set"], r["editor"]) == key]
        print(f"| {key[0]} | {key[1]} | {_m(rs, 'rewrite_acc')} | {_m(rs, 'rephrase_acc')} | "
              f"{_m(rs, 'efficacy_success')} | {_m(rs, 'wild_rewrite_em')} | {_m(rs, 'wild_rewrite_contains')} | "
              f"{_m(rs, 'wild_rephrase_em')} | {_m(rs, 'wild_rephrase_contains')} | {_m(rs, 'wild_locality')} | "
              f"{_m(rs, 'pre_wild_rewrite_em')} |")
    print("\n| hard case | editor | fluency (own prompts) | fluency (unrelated prompts) | consistency | ME-PPL |")
    print("|---|---|---|---|---|---|")
    for r in flu:
        print(f"| {r['subject']} | {r['editor']} | {r['fluency_before']:.2f} -> {r['fluency_after']:.2f} | "
              f"{r['fluency_unrelated_before']:.2f} -> {r['fluency_unrelated_after']:.2f} | "
              f"{r['consistency_before']:.3f} -> {r['consistency_after']:.3f} | "
              f"{r['ppl_before']:.1f} -> {r['ppl_after']:.1f} |")


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
    eff = efficacy_rows(h, args.editors, sets)
    hard = [c for c in load_cases("builtin-hard") if c.subject in args.hard]
    vec = fit_tfidf(counterfact_documents(args.data_dir))
    # unrelated prompts: the generation prompts of CounterFact records, one per record, from the end of the sample
    unrelated = [c.generation_prompts[0] for c in load_cases("counterfact", data_dir=args.data_dir)[-args.unrelated:]]
    flu = fluency_rows(h, args.editors, hard, vec, unrelated) if hard else []
    print_tables(eff, flu)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"efficacy": eff, "fluency": flu, "threads": torch.get_num_threads(),
                               "seconds": time.perf_counter() - t0}, indent=1, default=str))
    print(f"\n{len(eff)} edits + {len(flu)} hard edits in {time.perf_counter() - t0:.0f} s; records in {out}")


if __name__ == "__main__":
    main()
