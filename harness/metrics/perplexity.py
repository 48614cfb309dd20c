"""Perplexity on general text: the cheap surrogate for collapse (Yang et al., 2024, "The Butterfly Effect of
Model Editing").

Protocol "me-ppl": per-sentence perplexity exp(mean NLL over the sentence's predicted tokens), then the mean over
sentences (the collapse paper's ME-PPL code; tokenizer defaults, so no BOS for models whose tokenizer adds none).
Also "token-weighted": exp(total NLL / total predicted tokens). Full-vocabulary logits are computed for at most
``chunk`` positions at a time, so long texts never hold a [T, V] matrix.

With a ``prefix`` (an in-context editor's demonstrations and new facts, e.g. IKE), each text is scored after the
prefix: the prefix's tokens are context only, and the predicted tokens are the same as without it (the text's
second token on), so the numbers compare with the unprefixed model's ("me-ppl after the prompt prefix"). The prefix
is run once and its keys and values reused by every batch (``SharedPrefix``; ``reuse_prefix=False`` runs it with
every text): the same perplexities up to float rounding (tests/test_prefix_cache.py).

Speed: texts are batched by length under a budget of ``max_tokens_per_batch`` padded positions (512: on ME-PPL_50
one batch of 50 x 55 positions held 2,750 positions for 1,352 tokens; batches of 512 hold 1,602). With ``below``
(a ``BelowLayer`` of layer L, when the model was edited at layer L and above only) the blocks below L are run once
per batch and reused by later calls (``harness.models.partial``); the numbers are the same (tests/test_speed.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from ..models.partial import BelowLayer
from ..tokens import pad_batch, token_budget_batches
from .prefix import SharedPrefix, hidden_states

PROTOCOLS = {"ppl": "me-ppl (mean of per-sentence perplexity)", "ppl_token": "token-weighted perplexity"}
PREFIXED = ("each text after the in-context editor's prompt prefix (prefix tokens are context, not scored; the "
            "same tokens are predicted as without it)")


@dataclass
class PerplexityResult:
    mean_ppl: float                 # mean over sentences of per-sentence perplexity (ME-PPL)
    token_ppl: float                # exp(total NLL / total tokens)
    per_text: list[float]          # in input order, texts under two tokens left out
    n_tokens: int


@torch.no_grad()
def perplexity(model, tok, texts: Sequence[str], *, max_tokens_per_batch: int = 512, max_len: int = 1024,
               chunk: int = 1024, prefix: str = "", below: BelowLayer | None = None,
               reuse_prefix: bool = True) -> PerplexityResult:
    head, body = model.get_output_embeddings(), model.base_model
    device = next(model.parameters()).device
    encoded = [tok(t).input_ids[:max_len] for t in texts]
    p_ids = tok(prefix).input_ids if prefix else []
    order = sorted((i for i in range(len(encoded)) if len(encoded[i]) >= 2), key=lambda i: len(encoded[i]))
    if not order:
        raise ValueError("perplexity needs texts of at least two tokens")
    nll_sum = [0.0] * len(encoded)
    shared = SharedPrefix(body, p_ids, device) if p_ids and reuse_prefix else None
    inline = [] if shared else p_ids             # prefix tokens each batch runs (none when its keys are reused)
    P = len(inline)
    for batch in token_budget_batches([P + len(encoded[i]) for i in order], max_tokens_per_batch,
                                      max_batch=shared.max_rows() if shared else None):
        idx = [order[b] for b in batch]          # similar lengths together (sorted): little padding
        ids, mask = pad_batch([inline + encoded[i] for i in idx], tok.pad_token_id, device=device)
        if below is not None and not prefix:
            hidden = below.run(tuple(idx), ids, mask)                               # [b, T, d]
        else:
            hidden = hidden_states(body, ids, mask, shared)                        # [b, P + T, d]
        pred_mask = mask[:, 1:].bool()                                            # positions with a next token
        pred_mask[:, :P] = False                 # the prefix predicts nothing (nor does its last token: the
                                                 # text's first token is not scored without a prefix either)
        h = hidden[:, :-1][pred_mask]                                             # [N, d]
        gold = ids[:, 1:][pred_mask]                                              # [N]
        row_of = torch.arange(len(idx), device=device)[:, None].expand_as(pred_mask)[pred_mask]
        nll = torch.cat([F.cross_entropy(head(h[c:c + chunk]).float(), gold[c:c + chunk], reduction="none")
                         for c in range(0, len(h), chunk)])
        sums = torch.zeros(len(idx), device=device, dtype=torch.float64).index_add_(0, row_of, nll.double())
        for r, i in enumerate(idx):
            nll_sum[i] = float(sums[r])
    per_text, total_nll, total_n = [], 0.0, 0
    for i in sorted(order):                      # input order (texts shorter than two tokens are left out)
        n = len(encoded[i]) - 1
        per_text.append(math.exp(nll_sum[i] / n))
        total_nll += nll_sum[i]
        total_n += n
    return PerplexityResult(sum(per_text) / len(per_text), math.exp(total_nll / total_n), per_text, total_n)
