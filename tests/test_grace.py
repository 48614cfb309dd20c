"""GRACE on tiny random models: an input outside every deferral radius is computed bit for bit as by the unedited
model, the codebook follows the paper's add / expand / split rules, and undo, reset and a saved state are exact."""
from __future__ import annotations

import io

import pytest
import torch

from harness.data import load_texts
from harness.editors import build_editor
from harness.editors.common import capture_io
from harness.models import param_digest

HP = ["layer=2", "n_iter=25"]


@torch.no_grad()
def _logits(lm, texts):
    return [lm.model(input_ids=torch.tensor([lm.tokenizer(t).input_ids[:64]])).logits for t in texts]


@torch.no_grad()
def _layer_inputs(lm, layer, texts):
    """The wrapped module's input at every token of ``texts`` [m, d_in]."""
    module = lm.model.get_submodule(lm.adapter.mlp_name(layer))
    out = []
    for t in texts:
        with capture_io(module) as io_:
            lm.model(input_ids=torch.tensor([lm.tokenizer(t).input_ids[:64]]))
        out.append(io_["input"][0].float())
    return torch.cat(out)


def test_input_outside_every_radius_is_untouched_bit_for_bit(tiny_lm, builtin_cases):
    case = builtin_cases[0]
    unrelated = load_texts("builtin")[:4]
    key = _layer_inputs(tiny_lm, 2, [case.rewrite_prompt])[-1:]                 # the edit's query x*
    d_min = torch.cdist(key, _layer_inputs(tiny_lm, 2, unrelated)).min().item()
    grace = build_editor("grace", tiny_lm, HP + [f"eps={d_min / 2}"])           # every unrelated token outside
    before, own_before = _logits(tiny_lm, unrelated), _logits(tiny_lm, [case.rewrite_prompt])
    digest = param_digest(tiny_lm.model)
    edit = grace.apply(tiny_lm, [case])
    try:
        assert grace.attached and edit.info["n_keys"] == 1
        after = _logits(tiny_lm, unrelated)
        assert all(torch.equal(a, b) for a, b in zip(before, after))            # bit for bit
        own_after = _logits(tiny_lm, [case.rewrite_prompt])
        assert not torch.equal(own_before[0][0, -1], own_after[0][0, -1])       # the edited prompt did change
        assert param_digest(tiny_lm.model) == digest                            # no weight was written
    finally:
        edit.restore()
        grace.reset()
    assert not grace.attached
    assert all(torch.equal(a, b) for a, b in zip(before, _logits(tiny_lm, unrelated)))


def test_codebook_add_expand_split(tiny_llama, builtin_cases):
    grace = build_editor("grace", tiny_llama, HP + ["eps=1.0"])
    a, b = builtin_cases[0], builtin_cases[1]
    q = torch.zeros(8)
    out = torch.zeros(4)
    assert grace.insert(q, out, a)[:2] == (0, "add")
    # same label, 1.5 away: within eps_init + eps = 2, beyond eps = 1 -> the radius grows to cover it
    row, action, d = grace.insert(q + torch.tensor([1.5] + [0.0] * 7), out, a)
    assert (row, action, d) == (0, "expand", pytest.approx(1.5))
    assert grace.codebook.eps[0].item() == pytest.approx(1.5)
    # another label 2 away: within reach (1 + 1.5) -> a new entry, both radii split at half the distance
    row, action, d = grace.insert(q - torch.tensor([2.0] + [0.0] * 7), out, b)
    assert (row, action) == (1, "split")
    assert grace.codebook.eps.tolist() == pytest.approx([1.0 - 1e-5, 1.0])
    # far from everything -> a plain new entry with the initial radius
    assert grace.insert(q + 100, out, b)[:2] == (2, "add") and grace.codebook.eps[2].item() == 1.0
    assert grace.codebook.labels == [a.target_new, b.target_new, b.target_new]


def test_undo_removes_the_hook_and_a_state_resumes_exactly(tiny_llama, builtin_cases):
    prompts = [c.rewrite_prompt for c in builtin_cases[:3]]
    before = _logits(tiny_llama, prompts)
    grace = build_editor("grace", tiny_llama, HP + ["eps=0.5"])
    grace.prepare(tiny_llama)
    e1 = grace.apply(tiny_llama, [builtin_cases[0]])
    e2 = grace.apply(tiny_llama, [builtin_cases[1]])
    edited = _logits(tiny_llama, prompts)
    buf = io.BytesIO()
    torch.save(grace.state(), buf)
    e2.restore()
    assert len(grace.codebook) == 1
    e1.restore()
    assert not grace.attached and not tiny_llama.model.get_submodule(tiny_llama.adapter.mlp_name(2))._forward_hooks
    assert all(torch.equal(x, y) for x, y in zip(before, _logits(tiny_llama, prompts)))

    resumed = build_editor("grace", tiny_llama, HP + ["eps=0.5"])
    resumed.prepare(tiny_llama)
    buf.seek(0)
    resumed.load_state(torch.load(buf, weights_only=True))                      # as a sequential --resume does
    try:
        assert resumed.attached and len(resumed.codebook) == 2
        assert all(torch.equal(x, y) for x, y in zip(edited, _logits(tiny_llama, prompts)))
    finally:
        resumed.reset()
    assert all(torch.equal(x, y) for x, y in zip(before, _logits(tiny_llama, prompts)))


def test_grace_refuses_a_batch_and_fact_forcing(tiny_llama, builtin_cases):
    grace = build_editor("grace", tiny_llama, HP)
    with pytest.raises(ValueError, match="one case at a time"):
        grace.apply(tiny_llama, builtin_cases[:2])
    with pytest.raises(ValueError, match="does not apply"):
        grace.apply(tiny_llama, [builtin_cases[0].with_objective("force", noise_std=1.0)])
    assert not grace.attached
