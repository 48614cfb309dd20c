"""The speed-ups are exact: a partial forward pass (stop after a module, run from layer L on) gives bit-identical
numbers to the full pass on tiny random GPT-2 and Llama models, in fp32 and bf16, and so do the v* optimisation and
ROME's update that use it."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from harness.editors import common
from harness.editors.common import (
    batch_encode,
    capture_io,
    module_io_at,
    optimize_value,
)
from harness.editors.rome import ROME, RomeHparams
from harness.models.partial import (
    block_input,
    layers_from,
    stop_after,
    supports_layers_from,
)

TEXTS = ["The Eiffel Tower is located in", "Paris is the capital of", "A cat", "Danielle Darrieux speaks the language"]


@pytest.fixture(params=[torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def lm_any(request, tiny_lm):
    """Each tiny model in fp32, bf16 and fp16 (a copy; the session's fp32 model is left as it was): the GPU's
    half-precision code paths, run on CPU."""
    if request.param == torch.float32:
        return tiny_lm
    import copy
    return dataclasses.replace(tiny_lm, model=copy.deepcopy(tiny_lm.model).to(request.param))


@pytest.mark.parametrize("layer", [1, 2, 3])
@torch.no_grad()
def test_layers_from_gives_the_full_pass_bit_for_bit(lm_any, layer):
    lm = lm_any
    assert supports_layers_from(lm.model, lm.adapter)
    ids, mask = batch_encode(lm.tokenizer, TEXTS, lm.device)                   # right-padded, ragged
    body = lm.model.base_model
    full = body(input_ids=ids, attention_mask=mask).last_hidden_state
    with block_input(lm.model, lm.adapter, layer) as below:
        body(input_ids=ids, attention_mask=mask)
    with layers_from(lm.model, lm.adapter, layer):
        part = body(inputs_embeds=below["hidden"], attention_mask=mask).last_hidden_state
    assert torch.equal(part, full)
    assert lm.model.get_submodule(lm.adapter.layer_name(lm.n_layers - 1)) is not None   # the block list is back


def test_layers_from_restores_the_model_and_refuses_unsupported_families(tiny_lm):
    before = [(n, id(m), len(m._forward_hooks)) for n, m in tiny_lm.model.named_modules()]
    with layers_from(tiny_lm.model, tiny_lm.adapter, 2):
        assert len(list(tiny_lm.model.named_modules())) < len(before)
    assert [(n, id(m), len(m._forward_hooks)) for n, m in tiny_lm.model.named_modules()] == before
    other = dataclasses.replace(tiny_lm, adapter=dataclasses.replace(tiny_lm.adapter, family="mistral"))
    assert not supports_layers_from(other.model, other.adapter)
    with pytest.raises(ValueError, match="not supported"), layers_from(other.model, other.adapter, 1):
        pass


@torch.no_grad()
def test_module_io_at_stops_after_the_module_with_the_same_vectors(lm_any):
    lm = lm_any
    name = lm.adapter.mlp_name(1)
    positions = [3, 2, 1, 4]
    ins, outs = module_io_at(lm, name, TEXTS, positions)
    ids, mask = batch_encode(lm.tokenizer, TEXTS, lm.device)
    with capture_io(lm.model.get_submodule(name)) as io:
        lm.model(input_ids=ids, attention_mask=mask)
    rows, cols = torch.arange(len(TEXTS)), torch.tensor(positions)
    assert torch.equal(ins, io["input"][rows, cols].float())
    assert torch.equal(outs, io["output"][rows, cols].float())
    # the pass really stops: the last block never runs
    last = lm.model.get_submodule(lm.adapter.layer_name(lm.n_layers - 1))
    ran = []
    h = last.register_forward_hook(lambda *_: ran.append(1))
    try:
        module_io_at(lm, name, TEXTS[:1], [1])
    finally:
        h.remove()
    assert ran == []
    with stop_after(lm.model.get_submodule(name)):           # a stopped pass is quiet
        lm.model(input_ids=ids, attention_mask=mask)


def _full_pass(monkeypatch):
    monkeypatch.setattr(common, "supports_layers_from", lambda model, adapter: False)


@pytest.mark.parametrize("objective", ["rewrite", "erase", "force"])
@pytest.mark.parametrize("layer", [0, 1, 2])
def test_optimize_value_from_the_edit_layer_equals_the_full_pass(lm_any, builtin_cases, monkeypatch, objective,
                                                                 layer):
    lm, case = lm_any, dataclasses.replace(builtin_cases[1], objective=objective)
    templates = ["{}", "The weather today. {}", "It was said that. {}"]
    opt = common.ValueOpt(steps=6, early_stop_loss=0.0)
    name = lm.adapter.mlp_name(layer)
    fast = optimize_value(lm, case, name, templates, opt)
    with monkeypatch.context() as m:
        _full_pass(m)
        slow = optimize_value(lm, case, name, templates, opt)
    assert torch.isfinite(fast[0]).all()
    assert torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1])
    assert fast[2] == slow[2]
    assert fast[2]["v_steps"] == 6


def test_rome_update_is_identical_with_and_without_the_partial_passes(tiny_lm, builtin_cases, monkeypatch):
    hp = RomeHparams(layer=1, v_num_grad_steps=5, mom2_adjustment=False, context_template_length_params=[[3, 2]])
    fast = ROME(hp).rank_one_update(tiny_lm, builtin_cases[0])
    with monkeypatch.context() as m:
        _full_pass(m)
        m.setattr(common, "stop_after", lambda module: __import__("contextlib").nullcontext())
        slow = ROME(hp).rank_one_update(tiny_lm, builtin_cases[0])
    assert torch.equal(fast.delta, slow.delta) and torch.equal(fast.key, slow.key)
    assert fast.info == slow.info


def test_layer_of_reads_the_block_index(tiny_lm):
    a = tiny_lm.adapter
    assert a.layer_of(a.mlp_name(3)) == 3 and a.layer_of(a.weight_name(0)) == 0
    assert a.layer_of(a.embed) is None


@pytest.mark.parametrize("layer", [1, 2, 3])
def test_perplexity_from_the_edited_layer_equals_the_full_pass(tiny_lm, layer):
    from harness.data import load_texts
    from harness.metrics.perplexity import perplexity
    from harness.models.partial import BelowLayer

    model, tok = tiny_lm.model, tiny_lm.tokenizer
    texts = load_texts("builtin")[:12]
    below = BelowLayer(model, tiny_lm.adapter, layer)
    base = perplexity(model, tok, texts)
    assert perplexity(model, tok, texts, below=below).per_text == base.per_text       # first call: captures
    w = tiny_lm.adapter.mlp_weight(model, layer)
    saved = w.detach().clone()
    gen = torch.Generator().manual_seed(layer)
    with torch.no_grad():
        w.add_(0.5 * torch.randn(w.shape, generator=gen))                            # an edit of block `layer`
    try:
        edited_full = perplexity(model, tok, texts)
        edited_fast = perplexity(model, tok, texts, below=below)
    finally:
        with torch.no_grad():
            w.copy_(saved)
    assert edited_full.per_text != base.per_text
    assert edited_fast.per_text == edited_full.per_text
    assert edited_fast.mean_ppl == edited_full.mean_ppl and edited_fast.token_ppl == edited_full.token_ppl


def test_perplexity_batches_change_only_float_rounding(tiny_lm):
    """Smaller batches (less padding) than the old 4096-token budget: the same perplexities up to float rounding
    (relative 1e-5 here; 3e-7 on the embedded model, docs/speed.md)."""
    from harness.data import load_texts
    from harness.metrics.perplexity import perplexity

    texts = load_texts("builtin")[:30]
    one = perplexity(tiny_lm.model, tiny_lm.tokenizer, texts, max_tokens_per_batch=4096)
    many = perplexity(tiny_lm.model, tiny_lm.tokenizer, texts, max_tokens_per_batch=64)
    assert many.per_text == pytest.approx(one.per_text, rel=1e-5)
    assert many.mean_ppl == pytest.approx(one.mean_ppl, rel=1e-5)


def test_scoring_batches_change_only_float_rounding(tiny_lm, builtin_cases):
    """Target scores with the old single batch (8192 tokens) and the small-batch default agree to float rounding."""
    from harness.metrics.scoring import score_targets

    prompts, targets = [], []
    for c in builtin_cases[:4]:
        for p in (c.rewrite_prompt, *c.paraphrase_prompts, *c.neighborhood_prompts):
            prompts += [p, p]
            targets += [c.target_new, c.target_true]
    one = score_targets(tiny_lm.model, tiny_lm.tokenizer, prompts, targets, max_tokens=8192)
    many = score_targets(tiny_lm.model, tiny_lm.tokenizer, prompts, targets)
    assert [s.nll_mean for s in many] == pytest.approx([s.nll_mean for s in one], rel=1e-5, abs=1e-6)
    assert [s.token_accuracy for s in many] == [s.token_accuracy for s in one]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_rome_edits_a_half_precision_model_on_cpu(tiny_llama, builtin_cases, monkeypatch, dtype):
    """The GPU's half-precision path of a whole ROME edit (partial passes included), on CPU: the update is
    finite, lands in the model's dtype, and equals the full-pass update."""
    import copy
    lm = dataclasses.replace(tiny_llama, model=copy.deepcopy(tiny_llama.model).to(dtype))
    hp = RomeHparams(layer=1, v_num_grad_steps=4, mom2_adjustment=False, context_template_length_params=[[3, 2]])
    editor = ROME(hp)
    w = lm.adapter.mlp_weight(lm.model, 1)
    before = w.detach().clone()
    info = editor.execute(lm, [builtin_cases[0]])
    assert w.dtype == dtype and torch.isfinite(w).all() and not torch.equal(w, before)
    assert info["update_norm"] > 0
    with torch.no_grad():
        w.copy_(before)
    fast = ROME(hp).rank_one_update(lm, builtin_cases[0])
    with monkeypatch.context() as m:
        _full_pass(m)
        slow = ROME(hp).rank_one_update(lm, builtin_cases[0])
    assert torch.equal(fast.delta, slow.delta)
