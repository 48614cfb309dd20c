"""LoRA through peft on tiny random models: the edit trains only the adapters (base weights untouched while they are
in), undo removes them exactly (module tree, parameter names and bytes, outputs), a stream keeps training one
adapter and undoes edit by edit, and a saved state resumes exactly."""
from __future__ import annotations

import io

import pytest
import torch

from harness.editors import build_editor
from harness.models import param_digest

pytest.importorskip("peft")


def _hp(lm):
    targets = "[c_attn]" if lm.adapter.family == "gpt2" else "[q_proj,v_proj]"
    return [f"target_modules={targets}", "num_steps=15", "lr=1e-2"]


@torch.no_grad()
def _logits(lm, texts):
    return [lm.model(input_ids=torch.tensor([lm.tokenizer(t).input_ids])).logits for t in texts]


def _tree(model):
    return [(n, type(m).__name__) for n, m in model.named_modules()]


def test_base_weights_untouched_and_adapter_removed_exactly(tiny_lm, builtin_cases):
    case = builtin_cases[0]
    prompts = [case.rewrite_prompt, "The river begins as a cluster of springs"]
    digest, tree, before = param_digest(tiny_lm.model), _tree(tiny_lm.model), _logits(tiny_lm, prompts)
    base = {n: p.detach().clone() for n, p in tiny_lm.model.named_parameters()}
    lora = build_editor("lora", tiny_lm, _hp(tiny_lm))
    edit = lora.apply(tiny_lm, [case])
    try:
        assert lora.attached and edit.info["adapter_delta_fro"] > 0 and edit.info["steps"] == 15
        assert edit.info["loss"][-1] < edit.info["loss"][0]
        params = dict(tiny_lm.model.named_parameters())
        for n, w in base.items():                     # each base weight, under its own or its base_layer name
            p = params.get(n, params.get(n.replace(".weight", ".base_layer.weight").replace(
                ".bias", ".base_layer.bias")))
            assert p is not None and torch.equal(p, w)
        assert not torch.equal(before[0], _logits(tiny_lm, prompts)[0])       # the adapter does change outputs
        assert not any(p.requires_grad for p in tiny_lm.model.parameters())
    finally:
        edit.restore()
        lora.reset()
    assert not lora.attached
    assert param_digest(tiny_lm.model) == digest and _tree(tiny_lm.model) == tree
    assert all(torch.equal(a, b) for a, b in zip(before, _logits(tiny_lm, prompts)))


def test_a_stream_trains_one_adapter_and_undoes_edit_by_edit(tiny_llama, builtin_cases):
    tree = _tree(tiny_llama.model)
    lora = build_editor("lora", tiny_llama, _hp(tiny_llama))
    e1 = lora.apply(tiny_llama, [builtin_cases[0]])
    after1 = lora.adapter_weights()
    e2 = lora.apply(tiny_llama, builtin_cases[1:3])                          # a batch of two, same adapter
    assert e2.case_ids == [c.case_id for c in builtin_cases[1:3]]
    assert any(not torch.equal(after1[n], w) for n, w in lora.adapter_weights().items())
    e2.restore()
    assert all(torch.equal(after1[n], w) for n, w in lora.adapter_weights().items())
    e1.restore()
    assert not lora.attached and _tree(tiny_llama.model) == tree


def test_state_resumes_the_adapter_exactly(tiny_llama, builtin_cases):
    prompts = [c.rewrite_prompt for c in builtin_cases[:2]]
    before = _logits(tiny_llama, prompts)
    lora = build_editor("lora", tiny_llama, _hp(tiny_llama))
    edit = lora.apply(tiny_llama, [builtin_cases[0]])
    edited = _logits(tiny_llama, prompts)
    buf = io.BytesIO()
    torch.save(lora.state(), buf)
    edit.restore()
    assert all(torch.equal(a, b) for a, b in zip(before, _logits(tiny_llama, prompts)))
    resumed = build_editor("lora", tiny_llama, _hp(tiny_llama))
    buf.seek(0)
    resumed.load_state(torch.load(buf, weights_only=True))   # before prepare, as a sequential --resume does
    assert not resumed.attached
    resumed.prepare(tiny_llama)
    try:
        assert resumed.attached
        assert all(torch.equal(a, b) for a, b in zip(edited, _logits(tiny_llama, prompts)))
    finally:
        resumed.reset()
    assert all(torch.equal(a, b) for a, b in zip(before, _logits(tiny_llama, prompts)))


def test_a_failed_edit_removes_the_adapter(tiny_llama, builtin_cases, monkeypatch):
    tree = _tree(tiny_llama.model)
    lora = build_editor("lora", tiny_llama, _hp(tiny_llama))

    def boom(lm, cases):
        raise RuntimeError("boom")

    monkeypatch.setattr(lora, "execute", boom)
    with pytest.raises(RuntimeError, match="boom"):
        lora.apply(tiny_llama, [builtin_cases[0]])
    assert not lora.attached and _tree(tiny_llama.model) == tree


def test_the_edit_does_not_depend_on_the_global_generator(tiny_llama, builtin_cases):
    """The adapters' random initialisation is seeded (hparam ``seed``), so an edit gives the same adapter whatever
    ran before it in the process (the gate's run-to-run reproducibility), and the caller's generator is left as it
    was."""
    case = builtin_cases[0]
    adapters = []
    for state in (1, 2):
        torch.manual_seed(state)
        lora = build_editor("lora", tiny_llama, _hp(tiny_llama))
        edit = lora.apply(tiny_llama, [case])
        adapters.append(lora.adapter_weights())
        after = torch.rand(1)
        torch.manual_seed(state)
        assert torch.equal(after, torch.rand(1))         # the init drew from a forked generator
        edit.undo()
    assert adapters[0].keys() == adapters[1].keys()
    assert all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])
    other = build_editor("lora", tiny_llama, [*_hp(tiny_llama), "seed=1"])
    edit = other.apply(tiny_llama, [case])
    assert not torch.equal(*(w[next(k for k in w if ".lora_A." in k)] for w in (adapters[0], other.adapter_weights())))
    edit.undo()
