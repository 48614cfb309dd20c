"""WILD metrics: answer matching, greedy generation (batched = one at a time = a plain argmax loop), the three stop
criteria driven through a real model, and per-case scoring."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, strategies as st

from harness.data import EditCase
from harness.metrics.wild import (Generation, _finish, case_generations, case_metrics, contains, exact_match,
                                  generate_greedy, normalize_answer, score, wild_scores)


# ------------------------------------------------------------------------------------------------------ matching

def test_normalize_answer_squad_rules():
    assert normalize_answer("  The  Eiffel-Tower, in PARIS! ") == "eiffeltower in paris"
    assert normalize_answer("an apple a day") == "apple day"
    assert normalize_answer("Theatre") == "theatre"          # articles only as whole words


def test_exact_match_and_containment():
    assert exact_match(" Paris.", "paris")
    assert not exact_match("Paris, France", "Paris")
    assert contains("It is Paris, France", "Paris")
    assert not contains("Parisian food", "Paris")             # whole words only
    assert not contains("anything", "the")                    # a target that normalises to nothing never matches
    assert exact_match("Kai Wegner", ["Kai Peter Wegner", "Kai Wegner"])     # any alias
    assert contains("Wilt Chamberlain scored 100", "Wilt Chamberlain *")    # footnote marker is punctuation


@given(st.text(max_size=40), st.text(max_size=20))
def test_exact_implies_contains_when_target_nonempty(prediction, target):
    if exact_match(prediction, target) and normalize_answer(target):
        assert contains(prediction, target)
    assert normalize_answer(normalize_answer(prediction)) == normalize_answer(prediction)


# ---------------------------------------------------------------------------------------------------- generation

PROMPTS = ["Paris is the capital of", "The Eiffel Tower is located in the city of", "Toronto is", "A"]


def _manual_greedy(lm, prompt: str, n: int) -> list[int]:
    """Greedy decoding the slow way: a full forward pass per step on the unpadded sequence."""
    ids = lm.tokenizer(prompt).input_ids
    new = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(lm.model(torch.tensor([ids + new])).logits[0, -1].argmax())
            new.append(nxt)
            if nxt == lm.tokenizer.eos_token_id:
                break
    return new


def test_batched_greedy_equals_single_and_manual_loop(tiny_lm):
    lm = tiny_lm
    batched = generate_greedy(lm.model, lm.tokenizer, PROMPTS, max_new_tokens=10, stop_strings=())
    for p, g in zip(PROMPTS, batched):
        assert g == generate_greedy(lm.model, lm.tokenizer, [p], max_new_tokens=10, stop_strings=())[0]
        expected = _finish(lm.tokenizer, p, _manual_greedy(lm, p, 10), (), {lm.tokenizer.eos_token_id})
        assert g == expected
        assert g.stop in ("budget", "eos") and g.n_tokens <= 10


class _Bias:
    """Forward hook on the output head adding a large logit to chosen tokens (drives generation on a random model)."""

    def __init__(self, lm, tokens: list[int], *, step_tokens: list[int] | None = None):
        self.lm, self.tokens, self.step_tokens = lm, tokens, step_tokens

    def __enter__(self):
        def hook(module, args, out):
            out = out.clone()
            out[..., self.tokens] += 1e4
            return out
        self.handle = self.lm.model.get_output_embeddings().register_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_stop_string_eos_and_budget_through_generate(tiny_llama):
    lm, tok = tiny_llama, tiny_llama.tokenizer
    period = tok(".", add_special_tokens=False).input_ids
    assert len(period) == 1
    with _Bias(lm, period):
        g = generate_greedy(lm.model, tok, PROMPTS[:2], max_new_tokens=20)
    assert [x.stop for x in g] == ["stop-string", "stop-string"]
    assert [x.text for x in g] == ["", ""] and all(x.n_tokens == 1 for x in g)   # stopped at once, "." cut off
    with _Bias(lm, [tok.eos_token_id]):
        g = generate_greedy(lm.model, tok, PROMPTS[:2], max_new_tokens=20)
    assert [(x.stop, x.n_tokens) for x in g] == [("eos", 0), ("eos", 0)]
    word = tok(" Paris", add_special_tokens=False).input_ids
    with _Bias(lm, word[:1]):
        g = generate_greedy(lm.model, tok, PROMPTS[:2], max_new_tokens=7)
    assert [(x.stop, x.n_tokens) for x in g] == [("budget", 7), ("budget", 7)]
    assert g[0].answer.startswith(tok.decode(word[:1]).strip())


def test_finish_cuts_at_first_stop_string(tiny_tokenizer):
    tok = tiny_tokenizer
    ids = tok(" Paris. The capital\nof", add_special_tokens=False).input_ids
    g = _finish(tok, "p", ids, (".", "\n"), {tok.eos_token_id})
    assert (g.text, g.stop) == (" Paris", "stop-string")
    g = _finish(tok, "p", ids + [tok.eos_token_id] + ids, ("\n",), {tok.eos_token_id})
    assert (g.text, g.stop, g.n_tokens) == (" Paris. The capital", "stop-string", len(ids))
    g = _finish(tok, "p", ids[:2], ("\n",), {tok.eos_token_id})
    assert g.stop == "budget"


def test_context_and_prefix_change_the_input(tiny_llama):
    lm = tiny_llama
    plain = generate_greedy(lm.model, lm.tokenizer, ["Toronto is"], max_new_tokens=6, stop_strings=())[0]
    inst = generate_greedy(lm.model, lm.tokenizer, ["Toronto is"], max_new_tokens=6, stop_strings=(),
                           context="qa_inst")[0]
    manual = generate_greedy(lm.model, lm.tokenizer, ["Please answer the question:\n\nQ: Toronto is\nA:"],
                             max_new_tokens=6, stop_strings=())[0]
    assert inst.text == manual.text and inst.text != plain.text
    with pytest.raises(ValueError, match="context"):
        generate_greedy(lm.model, lm.tokenizer, ["x"], context="no placeholder")


# ------------------------------------------------------------------------------------------------------- scoring

def _gen(text: str) -> Generation:
    return Generation("p", text, "stop-string", 3)


CASE = EditCase(case_id="c", subject="Toronto", prompt="{} is located in the country of", target_new="Italy",
                target_true="Canada", paraphrase_prompts=("Where is Toronto? In", "Toronto lies in"),
                neighborhood_prompts=("Vancouver is in",), locality=(("Who wrote Hamlet?", "Shakespeare"),))


def test_case_metrics_from_generations():
    post = {"rewrite": [_gen(" Italy")], "rephrase": [_gen(" Italy, of course"), _gen(" Canada")],
            "neighborhood": [_gen(" Italy")], "locality": [_gen(" Shakespeare")]}
    pre = {"neighborhood": [_gen(" Canada")], "locality": [_gen(" Shakespeare")]}
    m = case_metrics(CASE, post, pre)
    assert m["wild_rewrite_em"] == 1.0 and m["wild_rewrite_contains"] == 1.0
    assert m["wild_rephrase_em"] == 0.0 and m["wild_rephrase_contains"] == 0.5
    assert m["wild_neighborhood_em"] == 0.0                 # the edit bled into the neighbour
    assert m["wild_locality"] == 0.5                        # neighbour changed, the QA pair did not
    assert m["wild_locality_em"] == 1.0
    assert case_metrics(CASE, post)["wild_locality"] is None


def test_case_generations_groups_and_scores_on_a_model(tiny_llama):
    lm = tiny_llama
    gens = case_generations(lm.model, lm.tokenizer, CASE, max_new_tokens=5)
    assert {k: len(v) for k, v in gens.items()} == {"rewrite": 1, "rephrase": 2, "neighborhood": 1, "locality": 1}
    assert gens["rephrase"][1] == generate_greedy(lm.model, lm.tokenizer, ["Toronto lies in"], max_new_tokens=5)[0]
    m = case_metrics(CASE, gens, gens)
    assert m["wild_locality"] == 1.0                       # the same model: nothing changed
    direct = wild_scores(lm.model, lm.tokenizer, [CASE.rewrite_prompt], ["Italy"], max_new_tokens=5)
    assert m["wild_rewrite_em"] == float(direct[0].exact)
    with pytest.raises(ValueError, match="targets"):
        score(gens["rewrite"], ["a", "b"])
