"""harness.tokens: padding and token-budget batching (property tests) and the context-length check."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.tokens import PromptTooLong, check_context, pad_batch, token_budget_batches

seqs_st = st.lists(st.lists(st.integers(1, 500), max_size=12), min_size=1, max_size=8)


@given(seqs_st, st.sampled_from(["left", "right"]))
def test_pad_batch_keeps_every_token_in_place(seqs, side):
    ids, mask = pad_batch(seqs, pad_id=0, side=side)
    T = max(map(len, seqs))
    assert ids.shape == mask.shape == (len(seqs), T)
    for r, s in enumerate(seqs):
        kept = ids[r][mask[r].bool()].tolist()
        assert kept == s
        assert int(mask[r].sum()) == len(s)
        if s:   # the real tokens are contiguous at the chosen side
            where = mask[r].nonzero().flatten()
            assert (where[0] == 0) if side == "right" else (where[-1] == T - 1)
    assert (ids[mask == 0] == 0).all()


def test_pad_batch_none_pad_and_fixed_length():
    ids, mask = pad_batch([[5, 6]], pad_id=None, length=4)
    assert ids.tolist() == [[5, 6, 0, 0]] and mask.tolist() == [[1, 1, 0, 0]]
    with pytest.raises(ValueError, match="more than the batch length"):
        pad_batch([[1, 2, 3]], 0, length=2)


@settings(max_examples=200)
@given(st.lists(st.integers(1, 300), max_size=40), st.integers(1, 1000), st.none() | st.integers(1, 8))
def test_token_budget_batches_partition_within_budget(lengths, budget, max_batch):
    batches = list(token_budget_batches(lengths, budget, max_batch=max_batch))
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))                  # every index exactly once
    for b in batches:
        padded = max(lengths[i] for i in b) * len(b)
        assert padded <= budget or len(b) == 1                        # a long sequence goes alone
        assert max_batch is None or len(b) <= max_batch
    assert [lengths[i] for i in flat] == sorted(lengths)              # shortest first


def test_check_context_names_lengths():
    model = torch.nn.Module()
    model.config = type("C", (), {"max_position_embeddings": 16})()
    check_context(16, model, "x")
    with pytest.raises(PromptTooLong, match="17 tokens, more than the model's context of 16"):
        check_context(17, model, "prompt 'a'")
