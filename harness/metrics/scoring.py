"""Batched teacher-forced scoring of targets after prompts: the one forward-pass primitive the metrics share."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from ..tokens import check_context, encode_target, pad_batch, token_budget_batches
from .prefix import hidden_states, shared_prefix


@dataclass
class TargetScore:
    nll_mean: float        # mean negative log-probability per target token
    nll_sum: float
    n_tokens: int
    token_accuracy: float  # fraction of target tokens that are the argmax under teacher forcing

    @property
    def prob(self) -> float:
        """exp(-mean NLL): ROME's per-token-averaged probability."""
        return float(torch.exp(torch.tensor(-self.nll_mean)))


def _head_and_body(model):
    return model.get_output_embeddings(), model.base_model


@torch.no_grad()
def score_targets(model, tok, prompts: Sequence[str], targets: Sequence[str], *, prefix: str = "",
                  batch_size: int = 64, max_tokens: int = 256, reuse_prefix: bool = True) -> list[TargetScore]:
    """Score ``targets[i]`` after ``prefix + prompts[i]`` in batched forward passes.

    Prompt and target are tokenised separately and concatenated (the target with a leading space), so the target's
    tokens are the same whatever the prompt. Logits are computed only at the target positions. Batches hold at most
    ``batch_size`` rows and ``max_tokens`` padded tokens; a sequence beyond the model's context raises PromptTooLong.
    The small token budget is for speed: sequences of similar length share a batch, so little is padding (a
    CounterFact case's 46 sequences: one batch of 546 padded positions for 282 tokens, or two of 366 in all);
    batch composition changes the scores only by float rounding (tests/test_speed.py).

    With a ``prefix`` (an in-context editor's), the token prefix every sequence shares is run once and its keys and
    values reused (``SharedPrefix``; ``reuse_prefix=False`` runs every sequence whole): the same scores up to float
    rounding (tests/test_prefix_cache.py), the prefix's cost paid once per call instead of once per sequence."""
    assert len(prompts) == len(targets)
    head, body = _head_and_body(model)
    device = next(model.parameters()).device
    seqs, spans = [], []
    for p, t in zip(prompts, targets):
        p_ids = tok(prefix + p).input_ids
        t_ids = encode_target(tok, t)
        check_context(len(p_ids) + len(t_ids), model, f"prompt {p[:60]!r} with target {t!r}")
        seqs.append(p_ids + t_ids)
        spans.append((len(p_ids), len(t_ids)))
    out: list[TargetScore | None] = [None] * len(seqs)
    # the shared token prefix, run once: it must end before every sequence's first predicting position
    shared, c = (shared_prefix(body, seqs, tok(prefix).input_ids, [s - 1 for s, _ in spans], device)
                 if prefix and reuse_prefix else (None, 0))
    for idx in token_budget_batches([len(s) - c for s in seqs], max_tokens,
                                    max_batch=min(batch_size, shared.max_rows()) if shared else batch_size):
        ids, mask = pad_batch([seqs[i][c:] for i in idx], tok.pad_token_id)
        rows, cols, gold = [], [], []
        for r, i in enumerate(idx):
            start, n = spans[i]
            for j in range(n):
                rows.append(r)
                cols.append(start - 1 + j - c)   # the position that predicts target token j
                gold.append(seqs[i][start + j])
        hidden = hidden_states(body, ids.to(device), mask.to(device), shared)                 # [b, T - c, d]
        logits = head(hidden[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]).float()
        gold_t = torch.tensor(gold, device=device)
        nll = F.cross_entropy(logits, gold_t, reduction="none")
        hit = (logits.argmax(-1) == gold_t).float()
        k = 0
        for i in idx:
            n = spans[i][1]
            out[i] = TargetScore(float(nll[k:k + n].mean()), float(nll[k:k + n].sum()), n, float(hit[k:k + n].mean()))
            k += n
    return out  # type: ignore[return-value]
