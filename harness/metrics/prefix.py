"""A token prefix shared by every sequence of one scoring call, run through the model once.

An in-context editor (IKE) puts the same prompt prefix, hundreds of tokens of demonstrations and new facts, before
every input the metrics score. Without reuse each scored sequence runs the whole prefix again: a CounterFact case's
46 sequences after a 560-token prefix are ~26,000 positions for ~700 of their own. Causal attention makes the
prefix's keys and values independent of what follows it, so they are computed once per call (``SharedPrefix``) and
every batch runs only its own tokens, attending to them:

    cache = body(prefix_ids [1, n])                      keys / values of every layer, [1, heads, n, d_head]
    hidden = body(ids [B, T], past = cache repeated B times, positions n .. n + T - 1)      [B, T, d_model]

The hidden states equal the full pass's at the same positions up to float rounding (the matrix products see other
shapes; tests/test_prefix_cache.py bounds the difference on tiny GPT-2 and Llama models).

Only the token ids matter: a prefix tokenised together with what follows can merge tokens across the boundary, so
callers reuse the longest *token* prefix common to every sequence (``common_prefix``), never a character prefix.
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch

from ..models.kvcache import cache_arg, returned_cache

#: rows x prefix positions of the cache one batch may hold (the repeated keys and values: on SmolLM2-135M 4,096
#: positions are 30 layers x 2 x [4096, 192] fp32 = 189 MB)
MAX_CACHED_POSITIONS = 4096


def common_prefix(seqs: Sequence[Sequence[int]], ids: Sequence[int]) -> int:
    """Length of the longest token prefix of ``ids`` that every sequence of ``seqs`` starts with."""
    n = len(ids)
    for s in seqs:
        m = min(n, len(s))
        k = 0
        while k < m and s[k] == ids[k]:
            k += 1
        n = k
    return n


def shared_prefix(body, seqs: Sequence[Sequence[int]], prefix_ids: Sequence[int], first_read: Sequence[int],
                  device) -> tuple["SharedPrefix | None", int]:
    """The prefix of ``seqs`` (each tokenised with the prefix text in front) to run once: the longest token prefix of
    ``prefix_ids`` all of them share, cut so that it ends before every sequence's first position whose hidden state
    is read (``first_read[i]``). Returns (its ``SharedPrefix``, its length c), or (None, 0) when nothing is shared;
    callers then run ``seq[c:]`` of every sequence."""
    c = min(common_prefix(seqs, prefix_ids), *first_read) if seqs and prefix_ids else 0
    return (SharedPrefix(body, seqs[0][:c], device), c) if c > 0 else (None, 0)


class SharedPrefix:
    """The keys and values of ``ids`` (a token prefix) at every layer of ``body``, computed once and reused by
    ``hidden`` for batches of continuations."""

    def __init__(self, body, ids: Sequence[int], device) -> None:
        if not ids:
            raise ValueError("SharedPrefix needs at least one token")
        self.n = len(ids)                                                           # prefix positions
        with torch.no_grad():
            self.cache = returned_cache(body(input_ids=torch.tensor([list(ids)], device=device),
                                             use_cache=True))                       # [1, heads, n, d_head] per layer

    def max_rows(self, budget: int = MAX_CACHED_POSITIONS) -> int:
        """Rows one batch may hold so that the repeated cache stays within ``budget`` positions."""
        return max(1, budget // self.n)

    def hidden(self, body, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Last hidden states of continuations ``ids`` [B, T] (right-padded, ``mask`` [B, T]) after the prefix:
        [B, T, d_model], position j of row r being the full sequence's position n + j."""
        B, T = ids.shape
        cache = copy.deepcopy(self.cache)          # the forward appends the continuation's keys to the cache
        if B > 1:
            cache.batch_repeat_interleave(B)
        full_mask = torch.cat([mask.new_ones(B, self.n), mask], dim=1)                                # [B, n + T]
        pos = torch.arange(self.n, self.n + T, device=ids.device).expand(B, T)                         # [B, T]
        return body(input_ids=ids, attention_mask=full_mask, position_ids=pos, **cache_arg(body, cache),
                    use_cache=True).last_hidden_state


def hidden_states(body, ids: torch.Tensor, mask: torch.Tensor, shared: SharedPrefix | None = None) -> torch.Tensor:
    """Last hidden states of ``ids`` [B, T] (``mask`` [B, T]): continuing ``shared``'s prefix when there is one, else
    from position 0. [B, T, d_model]"""
    if shared is not None:
        return shared.hidden(body, ids, mask)
    return body(input_ids=ids, attention_mask=mask).last_hidden_state
