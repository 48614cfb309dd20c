"""Metrics on tiny models: batched scoring equals one-at-a-time scoring, perplexity follows its protocol."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from harness.editors.common import encode_target
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


def test_counterfact_metrics_shape(tiny_llama, builtin_cases):
    m = counterfact_metrics(tiny_llama.model, tiny_llama.tokenizer, builtin_cases[0])
    for k in ("efficacy_success", "paraphrase_success", "neighborhood_success", "rewrite_acc", "locality_acc"):
        assert 0.0 <= m[k] <= 1.0
    assert -1.0 <= m["efficacy_magnitude"] <= 1.0
