"""Metrics on tiny models: batched scoring equals one-at-a-time scoring, perplexity follows its protocol, and the
CounterFact metrics equal ROME's definitions computed here from the full logits of one prompt at a time."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from harness.tokens import encode_target
from harness.metrics import counterfact_metrics, perplexity, score_targets


def test_score_targets_matches_manual(tiny_lm):
    lm = tiny_lm
    prompts, targets = ["Paris is the capital of", "The Eiffel Tower is in"], ["France", "Rome"]
    batched = score_targets(lm.model, lm.tokenizer, prompts, targets)
    for p, t, s in zip(prompts, targets, batched):
        p_ids, t_ids = lm.tokenizer(p).input_ids, encode_target(lm.tokenizer, t)
        ids = torch.tensor([p_ids + t_ids])
        with torch.no_grad():
            logp = F.log_softmax(lm.model(ids).logits[0], -1)
        nll = [-logp[len(p_ids) - 1 + j, tok].item() for j, tok in enumerate(t_ids)]
        assert math.isclose(s.nll_mean, sum(nll) / len(nll), rel_tol=1e-4)
        assert s.n_tokens == len(t_ids)


def test_perplexity_batched_equals_single(tiny_lm):
    lm = tiny_lm
    texts = ["A short sentence.", "A somewhat longer sentence about the weather in the mountains today.",
             "Numbers: one two three four five six seven eight nine ten."]
    res = perplexity(lm.model, lm.tokenizer, texts, max_tokens_per_batch=64, chunk=7)
    singles = [perplexity(lm.model, lm.tokenizer, [t]).mean_ppl for t in texts]
    assert math.isclose(res.mean_ppl, sum(singles) / 3, rel_tol=1e-4)
    assert len(res.per_text) == 3
    for t, s in zip(texts, res.per_text):
        assert math.isclose(s, perplexity(lm.model, lm.tokenizer, [t]).mean_ppl, rel_tol=1e-4)


def _direct(lm, prompt: str, target: str) -> tuple[float, float]:
    """(per-token-averaged probability exp(-mean NLL), teacher-forced argmax accuracy) of ``target`` after
    ``prompt``, from the full logits of the unpadded sequence."""
    p_ids, t_ids = lm.tokenizer(prompt).input_ids, encode_target(lm.tokenizer, target)
    with torch.no_grad():
        logp = F.log_softmax(lm.model(torch.tensor([p_ids + t_ids])).logits[0].double(), -1)
    rows = [logp[len(p_ids) - 1 + j] for j in range(len(t_ids))]
    nll = [-r[tok].item() for r, tok in zip(rows, t_ids)]
    acc = sum(int(r.argmax()) == tok for r, tok in zip(rows, t_ids)) / len(t_ids)
    return math.exp(-sum(nll) / len(nll)), acc


def test_counterfact_metrics_equal_rome_definitions(tiny_lm, builtin_cases):
    lm = tiny_lm
    for case in builtin_cases[:3]:
        m = counterfact_metrics(lm.model, lm.tokenizer, case)

        def pair(prompt):
            return _direct(lm, prompt, case.target_new), _direct(lm, prompt, case.target_true)
        (new, new_acc), (true, _) = pair(case.rewrite_prompt)
        assert m["efficacy_success"] == float(new > true)
        assert m["efficacy_magnitude"] == pytest.approx(new - true, abs=1e-5)
        assert m["rewrite_acc"] == pytest.approx(new_acc)
        para = [pair(p) for p in case.paraphrase_prompts]
        assert m["paraphrase_success"] == pytest.approx(sum(n > t for (n, _), (t, _) in para) / len(para))
        assert m["paraphrase_magnitude"] == pytest.approx(sum(n - t for (n, _), (t, _) in para) / len(para),
                                                          abs=1e-5)
        assert m["rephrase_acc"] == pytest.approx(sum(a for (_, a), _ in para) / len(para))
        neigh = [pair(p) for p in case.neighborhood_prompts]
        assert m["neighborhood_success"] == pytest.approx(sum(t > n for (n, _), (t, _) in neigh) / len(neigh))
        assert m["neighborhood_magnitude"] == pytest.approx(sum(t - n for (n, _), (t, _) in neigh) / len(neigh),
                                                            abs=1e-5)
        assert m["locality_acc"] == pytest.approx(sum(a for _, (_, a) in neigh) / len(neigh))
        parts = [m["efficacy_success"], m["paraphrase_success"], m["neighborhood_success"]]
        hm = len(parts) / sum(1 / x for x in parts) if min(parts) > 0 else 0.0
        assert m["rome_score"] == pytest.approx(hm)


def test_counterfact_metrics_follow_a_change_of_the_logits(tiny_gpt2, builtin_cases):
    """Adding 20 to the logits of target_new's tokens (a hook on the output head) makes target_new win on every
    prompt: efficacy and paraphrase success 1, neighbourhood success 0 (the metrics respond, they are not constants)."""
    lm, case = tiny_gpt2, builtin_cases[0]
    new_ids = sorted(set(encode_target(lm.tokenizer, case.target_new)) - set(encode_target(lm.tokenizer,
                                                                                         case.target_true)))

    def boost(_module, _inputs, logits):
        logits = logits.clone()
        logits[..., new_ids] += 20.0
        return logits
    pre = counterfact_metrics(lm.model, lm.tokenizer, case)
    handle = lm.model.get_output_embeddings().register_forward_hook(boost)
    try:
        m = counterfact_metrics(lm.model, lm.tokenizer, case)
    finally:
        handle.remove()
    assert (m["efficacy_success"], m["paraphrase_success"], m["neighborhood_success"]) == (1.0, 1.0, 0.0)
    assert m["efficacy_magnitude"] > pre["efficacy_magnitude"] and m["rewrite_acc"] == 1.0
    assert counterfact_metrics(lm.model, lm.tokenizer, case) == pre          # nothing left behind
