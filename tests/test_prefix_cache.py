"""A prompt prefix shared by every scored sequence (an in-context editor's) is run once and its keys and values
reused: the scores and perplexities equal those of running every sequence whole, up to float rounding, while the
model runs far fewer positions."""
from __future__ import annotations

import pytest

from harness.data import load_texts
from harness.metrics.perplexity import perplexity
from harness.metrics.prefix import SharedPrefix, common_prefix
from harness.metrics.scoring import score_targets

# an IKE-shaped prefix: demonstrations, the new fact, and a trailing "Prompt: " whose space BPE may merge onward
PREFIX = ("New Fact: The Eiffel Tower is in Rome\nPrompt: The Eiffel Tower is in Rome\n\n"
          "New Fact: Toronto is located in the country of Japan\nPrompt: Where is Toronto? Japan\n\n"
          "New Fact: The mother tongue of Danielle Darrieux is English\nPrompt: ")


class Positions:
    """Counts the token positions the base model is run on."""

    def __init__(self, model):
        self.n = 0
        self.handle = model.base_model.register_forward_pre_hook(self.count, with_kwargs=True)

    def count(self, _module, _args, kwargs):
        self.n += kwargs["input_ids"].numel()

    def close(self):
        self.handle.remove()


def test_common_prefix_is_the_longest_shared_token_prefix():
    assert common_prefix([[1, 2, 3, 4], [1, 2, 5]], [1, 2, 3]) == 2
    assert common_prefix([[1, 2, 3]], [1, 2, 3, 4]) == 3
    assert common_prefix([[9]], [1]) == 0
    assert common_prefix([], [1, 2]) == 2


def test_scores_after_a_shared_prefix_equal_the_whole_pass(tiny_lm, builtin_cases):
    model, tok = tiny_lm.model, tiny_lm.tokenizer
    case = builtin_cases[0]
    prompts = [case.rewrite_prompt.format(case.subject), *case.paraphrase_prompts, *case.neighborhood_prompts]
    targets = [case.target_new] * len(prompts)
    whole = Positions(model)
    full = score_targets(model, tok, prompts, targets, prefix=PREFIX, reuse_prefix=False)
    whole.close()
    reused = Positions(model)
    fast = score_targets(model, tok, prompts, targets, prefix=PREFIX)
    reused.close()
    for a, b in zip(full, fast):
        assert b.nll_sum == pytest.approx(a.nll_sum, rel=1e-5, abs=1e-6)
        assert (b.token_accuracy, b.n_tokens) == (a.token_accuracy, a.n_tokens)
    assert reused.n < whole.n / 3                                    # the prefix ran once, not once per prompt
    # without a prefix nothing changes
    assert [s.nll_sum for s in score_targets(model, tok, prompts, targets)] == \
           [s.nll_sum for s in score_targets(model, tok, prompts, targets, reuse_prefix=False)]


def test_scores_in_small_batches_of_a_long_prefix(tiny_llama, builtin_cases, monkeypatch):
    """The repeated cache is bounded: with room for two rows per batch the scores are the same."""
    model, tok = tiny_llama.model, tiny_llama.tokenizer
    case = builtin_cases[1]
    prompts = [case.rewrite_prompt.format(case.subject), *case.paraphrase_prompts]
    targets = [case.target_new] * len(prompts)
    full = score_targets(model, tok, prompts, targets, prefix=PREFIX, reuse_prefix=False)
    n = len(tok(PREFIX).input_ids)
    monkeypatch.setattr(SharedPrefix, "max_rows", lambda self, budget=0: 2)
    fast = score_targets(model, tok, prompts, targets, prefix=PREFIX)
    assert [s.nll_sum for s in fast] == pytest.approx([s.nll_sum for s in full], rel=1e-5)
    assert n > 20


def test_perplexity_after_a_shared_prefix_equals_the_whole_pass(tiny_lm):
    model, tok = tiny_lm.model, tiny_lm.tokenizer
    texts = load_texts("builtin")[:6]
    full = perplexity(model, tok, texts, prefix=PREFIX, max_len=100, reuse_prefix=False)
    fast = perplexity(model, tok, texts, prefix=PREFIX, max_len=100)
    assert fast.n_tokens == full.n_tokens
    assert fast.per_text == pytest.approx(full.per_text, rel=1e-5)
    assert fast.mean_ppl == pytest.approx(full.mean_ppl, rel=1e-5)


def test_locality_reads_after_a_shared_prefix_equal_the_whole_pass(tiny_lm):
    """The locality suite's teacher-forced argmax and final hidden states (KL drift) after an in-context prefix."""
    import torch

    from harness.locality import answer_argmax, final_hidden
    from harness.tokens import encode_target

    model, tok = tiny_lm.model, tiny_lm.tokenizer
    body, head = model.base_model, model.get_output_embeddings()
    pairs = [("The capital of France is", "Paris"), ("Toronto is located in", "Canada")]
    for (q, a), (got, a_ids) in zip(pairs, answer_argmax(model, tok, pairs, prefix=PREFIX)):
        q_ids = tok(PREFIX + q).input_ids
        with torch.no_grad():
            hidden = body(input_ids=torch.tensor([q_ids + a_ids])).last_hidden_state[0]
        assert a_ids == encode_target(tok, a)
        assert got == head(hidden[len(q_ids) - 1:len(q_ids) - 1 + len(a_ids)]).argmax(-1).tolist()
    texts = load_texts("builtin")[:3]
    p_ids = tok(PREFIX).input_ids
    ids, hidden = final_hidden(model, tok, texts, prefix_ids=p_ids, max_len=60)
    for t_ids, h in zip(ids, hidden):
        with torch.no_grad():
            full = body(input_ids=torch.tensor([p_ids + t_ids])).last_hidden_state[0, len(p_ids):-1]
        torch.testing.assert_close(h, full, rtol=1e-4, atol=1e-5)


def test_the_cache_goes_by_the_name_the_forward_takes():
    """transformers 5.x takes and returns the key/value cache as ``cache`` (``past_key_values`` warns, and goes in
    5.40); older versions know only ``past_key_values``: ``cache_arg`` / ``returned_cache`` follow the signature."""
    from dataclasses import dataclass

    import torch

    from harness.models.kvcache import cache_arg, returned_cache

    class New(torch.nn.Module):
        def forward(self, input_ids=None, cache=None, use_cache=None):
            return input_ids

    class Old(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None, use_cache=None):
            return input_ids

    @dataclass
    class OldOutput:
        past_key_values: object = None

    @dataclass
    class NewOutput:
        cache: object = None

        def __getitem__(self, key):
            return getattr(self, key)

    assert cache_arg(New(), "kv") == {"cache": "kv"} and cache_arg(Old(), "kv") == {"past_key_values": "kv"}
    assert returned_cache(OldOutput("kv")) == "kv" and returned_cache(NewOutput("kv")) == "kv"
