"""Tokenisation and batching shared by metrics, editors, statistics, locality and tracing: how a target is encoded
after a prompt, how variable-length sequences become one padded batch, and how sequences are grouped into batches
bounded by a token budget. Nothing here runs a model."""
from __future__ import annotations

from typing import Iterator, Sequence

import torch


class PromptTooLong(ValueError):
    """A sequence longer than the model's context window (the message names both lengths and the fix)."""


def encode_target(tok, target: str) -> list[int]:
    """Token ids of `` target`` as it follows a prompt (leading space, no special tokens), so that a target has the
    same tokens whatever the prompt before it."""
    return tok(" " + target.strip(), add_special_tokens=False).input_ids


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int | None, *, side: str = "right",
              length: int | None = None, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> (ids [n, T], attention mask [n, T]) padded with ``pad_id`` (0 when the tokenizer has none)
    on the ``right`` (the default) or the ``left``; ``T`` is ``length`` or the longest sequence."""
    if side not in ("right", "left"):
        raise ValueError(f"pad side {side!r}: expected 'right' or 'left'")
    T = max((len(s) for s in seqs), default=0) if length is None else length
    ids = torch.full((len(seqs), T), 0 if pad_id is None else pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for r, s in enumerate(seqs):
        n = len(s)
        if n > T:
            raise ValueError(f"sequence {r} has {n} tokens, more than the batch length {T}")
        if n:
            sl = slice(0, n) if side == "right" else slice(T - n, T)
            ids[r, sl] = torch.as_tensor(list(s), dtype=torch.long)
            mask[r, sl] = 1
    if device is not None:
        ids, mask = ids.to(device), mask.to(device)
    return ids, mask


def token_budget_batches(lengths: Sequence[int], max_tokens: int, *, max_batch: int | None = None
                         ) -> Iterator[list[int]]:
    """Indices of ``lengths`` grouped into batches, shortest first, so that each batch's padded size (rows x longest
    row) stays within ``max_tokens`` (a single sequence over the budget forms a batch of its own) and, if given,
    each batch has at most ``max_batch`` rows."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens}: must be >= 1")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    s = 0
    while s < len(order):
        e = s + 1
        while (e < len(order) and lengths[order[e]] * (e - s + 1) <= max_tokens
               and (max_batch is None or e - s < max_batch)):
            e += 1
        yield order[s:e]
        s = e


def context_length(model) -> int | None:
    """The model's context window in tokens (``max_position_embeddings`` / ``n_positions``), or None if unknown."""
    cfg = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(cfg, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def check_context(n_tokens: int, model, what: str) -> None:
    """Raise :class:`PromptTooLong` when ``n_tokens`` exceed the model's context window."""
    limit = context_length(model)
    if limit is not None and n_tokens > limit:
        raise PromptTooLong(f"{what} has {n_tokens} tokens, more than the model's context of {limit}: "
                            "shorten it or leave the record out of the data set")
