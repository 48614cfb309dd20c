"""CounterFact metrics (Meng et al., 2022) and EasyEdit-style token accuracy, for one edit case.

Protocol "rome-counterfact": for each prompt compare the per-token-averaged probabilities of target_new and
target_true (ROME's ``test_batch_prediction``):
  efficacy_success      P(new) > P(true) on the rewrite prompt          efficacy_magnitude      P(new) - P(true)
  paraphrase_success    same, mean over paraphrase prompts              paraphrase_magnitude
  neighborhood_success  P(true) > P(new), mean over neighbourhood prompts  neighborhood_magnitude P(true) - P(new)
  rome_score            harmonic mean of the three successes
Protocol "easyedit-teacher-forced": fraction of target_new tokens that are the argmax under teacher forcing on the
rewrite and paraphrase prompts (rewrite_acc, rephrase_acc), and of target_true tokens on neighbourhood prompts
(locality_acc, EasyEdit's "locality" with the true answer as reference).
"""
from __future__ import annotations

from statistics import harmonic_mean, mean
from typing import Sequence

from ..data.case import EditCase
from .scoring import score_targets

PROTOCOLS = {
    **{m: "rome-counterfact (per-token-averaged probability comparison)" for m in (
        "efficacy_success", "efficacy_magnitude", "paraphrase_success", "paraphrase_magnitude",
        "neighborhood_success", "neighborhood_magnitude", "rome_score")},
    **{m: "easyedit-teacher-forced (token argmax accuracy)" for m in ("rewrite_acc", "rephrase_acc", "locality_acc")},
}


def counterfact_metrics(model, tok, case: EditCase, *, prefix: str = "") -> dict[str, float | None]:
    """All CounterFact and token-accuracy metrics of ``case`` in one batched scoring call. A case without
    ``target_true`` (QAEdit, KnowEdit's WikiData_recent and WikiBio) gets the token accuracies only: the probability
    comparisons need the old answer."""
    if case.target_true is None:
        return token_accuracy_metrics(model, tok, case, prefix=prefix)
    groups: dict[str, Sequence[str]] = {
        "efficacy": [case.rewrite_prompt],
        "paraphrase": list(case.paraphrase_prompts),
        "neighborhood": list(case.neighborhood_prompts),
    }
    prompts, targets, keys = [], [], []
    for g, ps in groups.items():
        for i, p in enumerate(ps):
            for which, target in (("new", case.target_new), ("true", case.target_true)):
                prompts.append(p)
                targets.append(target)
                keys.append((g, i, which))
    scores = dict(zip(keys, score_targets(model, tok, prompts, targets, prefix=prefix)))
    out: dict[str, float | None] = {}
    for g, ps in groups.items():
        if not ps:
            out[f"{g}_success"] = out[f"{g}_magnitude"] = None
            continue
        p_new = [scores[(g, i, "new")].prob for i in range(len(ps))]
        p_true = [scores[(g, i, "true")].prob for i in range(len(ps))]
        if g == "neighborhood":
            out[f"{g}_success"] = mean(float(t > n) for n, t in zip(p_new, p_true))
            out[f"{g}_magnitude"] = mean(t - n for n, t in zip(p_new, p_true))
        else:
            out[f"{g}_success"] = mean(float(n > t) for n, t in zip(p_new, p_true))
            out[f"{g}_magnitude"] = mean(n - t for n, t in zip(p_new, p_true))
    parts = [out[f"{g}_success"] for g in groups if out[f"{g}_success"] is not None]
    out["rome_score"] = harmonic_mean(parts) if parts and min(parts) > 0 else 0.0
    out["rewrite_acc"] = scores[("efficacy", 0, "new")].token_accuracy
    out["rephrase_acc"] = (mean(scores[("paraphrase", i, "new")].token_accuracy for i in range(len(groups["paraphrase"])))
                           if groups["paraphrase"] else None)
    out["locality_acc"] = (mean(scores[("neighborhood", i, "true")].token_accuracy
                                for i in range(len(groups["neighborhood"]))) if groups["neighborhood"] else None)
    return out


def token_accuracy_metrics(model, tok, case: EditCase, *, prefix: str = "") -> dict[str, float | None]:
    """EasyEdit's teacher-forced ``rewrite_acc`` and ``rephrase_acc`` of target_new (no true target needed)."""
    prompts = [case.rewrite_prompt, *case.paraphrase_prompts]
    scores = score_targets(model, tok, prompts, [case.target_new] * len(prompts), prefix=prefix)
    return {"rewrite_acc": scores[0].token_accuracy,
            "rephrase_acc": mean(s.token_accuracy for s in scores[1:]) if scores[1:] else None}
