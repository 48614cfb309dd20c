"""WISE on tiny random models: the main memory (the model's own weights) is never written, the router sends
unrelated inputs to it (their outputs are bit for bit the unedited model's) and the edited prompt to the side
memory, an edit writes only its shard's masked entries within the norm constraint, shards are saved and TIES-merged
on schedule, and undo / reset / a saved state are exact."""
from __future__ import annotations

import io

import pytest
import torch

from harness.data import load_texts
from harness.editors import build_editor
from harness.editors.wise import ties_merge
from harness.models import param_digest

# margins scaled to a 64-wide random model (the reference's 5 / 20 / 10 are for Llama-7B activations)
HP = ["layer=2", "n_iter=30", "context_template_length_params=[[3,2]]", "alpha=0.02", "beta=0.3", "gamma=0.1",
      "norm_constraint=0.5"]


@torch.no_grad()
def _logits(lm, texts):
    return [lm.model(input_ids=torch.tensor([lm.tokenizer(t).input_ids[:64]])).logits for t in texts]


def _routes(wise, lm, texts):
    """The router's choice for each text: -1 main memory, else the index of a side memory."""
    out = []
    for t in texts:
        ids = torch.tensor([lm.tokenizer(t).input_ids[:64]])
        seen = {}
        module = lm.model.get_submodule(lm.adapter.mlp_name(wise.hparams.layer))
        h = module.register_forward_hook(lambda m, i, o: seen.update(x=i[0], out=o), prepend=True)
        with torch.no_grad():
            lm.model(input_ids=ids)
        h.remove()
        memories = wise.routable()
        router = wise._router
        valid = torch.ones(ids.shape, dtype=torch.bool)
        sides = [router.side(seen["x"], m.weight) for m, _ in memories]
        d = torch.stack([router.distance(seen["out"], s, valid, infer=True) for s in sides])
        out.append(int(wise.choose(d, torch.tensor([thr for _, thr in memories])[:, None])[0]))
    return out


def test_main_memory_untouched_and_unrelated_inputs_go_to_it(tiny_lm, builtin_cases):
    case = builtin_cases[0]
    unrelated = load_texts("builtin")[:5]
    before = _logits(tiny_lm, unrelated)
    own_before = _logits(tiny_lm, [case.rewrite_prompt])
    digest = param_digest(tiny_lm.model)
    wise = build_editor("wise", tiny_lm, HP)
    edit = wise.apply(tiny_lm, [case])
    try:
        assert param_digest(tiny_lm.model) == digest                        # the main memory is never written
        assert _routes(wise, tiny_lm, unrelated) == [-1] * len(unrelated)    # unrelated text -> main memory
        assert all(torch.equal(a, b) for a, b in zip(before, _logits(tiny_lm, unrelated)))   # ... bit for bit
        assert _routes(wise, tiny_lm, [case.rewrite_prompt]) == [0]          # the edit prompt -> side memory
        assert not torch.equal(own_before[0], _logits(tiny_lm, [case.rewrite_prompt])[0])
        assert edit.info["in_scope_distance"] > edit.info["threshold"] > edit.info["out_scope_distance"]
    finally:
        edit.restore()
        wise.reset()
    assert not wise.attached and not tiny_lm.model.base_model._forward_pre_hooks
    assert all(torch.equal(a, b) for a, b in zip(before, _logits(tiny_lm, unrelated)))


def test_edit_writes_only_its_shard_within_the_norm_constraint(tiny_llama, builtin_cases):
    wise = build_editor("wise", tiny_llama, HP + ["weight_decay=0", "mask_ratio=0.3"])
    w0 = tiny_llama.adapter.weight_as_linear(tiny_llama.model, 2).detach().clone()
    edit = wise.apply(tiny_llama, [builtin_cases[0]])
    try:
        delta = wise.current.weight - w0
        mask = wise.shard_mask(w0, 0)
        assert 0.2 < mask.float().mean().item() < 0.4
        assert torch.count_nonzero(delta[~mask]) == 0                         # knowledge sharding
        assert delta[mask].abs().max().item() > 0
        assert delta.abs().max().item() <= 0.5 + 1e-6                        # |W' - W| <= norm_constraint
    finally:
        edit.restore()
        wise.reset()


def test_shards_are_saved_and_merged_on_schedule(tiny_llama, builtin_cases):
    unrelated = load_texts("builtin")[:3]
    before = _logits(tiny_llama, unrelated)
    wise = build_editor("wise", tiny_llama, HP + ["save_freq=1", "merge_freq=2"])
    edits = [wise.apply(tiny_llama, [c]) for c in builtin_cases[:3]]
    try:
        # edit 1 -> saved shard; edit 2 -> shards 1 and 2 merged into one memory; edit 3 -> a second saved shard
        assert [e.info["merged"] for e in edits] == [False, True, False]
        assert len(wise.memories) == 2 and wise.memories[0].n_edits == 2 and wise.n_shards == 4
        assert not torch.equal(wise.shard_mask(wise.memories[1].weight, 0), wise.shard_mask(wise.memories[1].weight, 1))
        assert _routes(wise, tiny_llama, unrelated) == [-1] * len(unrelated)
        assert all(torch.equal(a, b) for a, b in zip(before, _logits(tiny_llama, unrelated)))
        edits[2].restore()
        assert len(wise.memories) == 1 and wise.n_edits == 2
    finally:
        for e in reversed(edits[:2]):
            e.restore()
        wise.reset()


def test_ties_merge_trims_elects_and_averages():
    base = torch.zeros(1, 4)
    t1 = torch.tensor([[3.0, -1.0, 0.1, 2.0]])
    t2 = torch.tensor([[1.0, 2.0, -0.3, -2.5]])
    # no trimming: elected signs of 0.5 t1 + 0.5 t2 = [+, +, -, -]; average the agreeing entries
    assert ties_merge(base, [t1, t2], [0.5, 0.5], 1.0)[0].tolist() == pytest.approx([2.0, 2.0, -0.3, -2.5])
    # density 0.5 keeps each vector's two largest entries: t1 -> [3, 0, 0, 2], t2 -> [0, 2, 0, -2.5]
    assert ties_merge(base, [t1, t2], [0.5, 0.5], 0.5)[0].tolist() == pytest.approx([3.0, 2.0, 0.0, -2.5])


def test_state_resumes_the_side_memories_exactly(tiny_llama, builtin_cases):
    prompts = [c.rewrite_prompt for c in builtin_cases[:2]] + load_texts("builtin")[:2]
    before = _logits(tiny_llama, prompts)
    wise = build_editor("wise", tiny_llama, HP + ["save_freq=1", "merge_freq=2"])
    e1 = wise.apply(tiny_llama, [builtin_cases[0]])
    edited = _logits(tiny_llama, prompts)
    buf = io.BytesIO()
    torch.save(wise.state(), buf)
    e1.restore()
    wise.reset()
    assert all(torch.equal(a, b) for a, b in zip(before, _logits(tiny_llama, prompts)))
    resumed = build_editor("wise", tiny_llama, HP + ["save_freq=1", "merge_freq=2"])
    resumed.prepare(tiny_llama)
    buf.seek(0)
    resumed.load_state(torch.load(buf, weights_only=True))
    try:
        assert all(torch.equal(a, b) for a, b in zip(edited, _logits(tiny_llama, prompts)))
        assert resumed.n_shards == 2 and torch.equal(resumed._mask, resumed.shard_mask(resumed.current.weight, 1))
    finally:
        resumed.reset()


def test_bad_schedule_is_a_clear_error(tiny_llama):
    with pytest.raises(ValueError, match="multiple of save_freq"):
        build_editor("wise", tiny_llama, ["layer=2", "save_freq=3", "merge_freq=4"])


def test_training_runs_only_the_layers_above_and_matches_the_full_model(tiny_llama, builtin_cases):
    from harness.editors.wise import UpperLayers
    wise = build_editor("wise", tiny_llama, HP)
    ids, mask, _ = wise.rows(tiny_llama, builtin_cases[0])
    upper = UpperLayers(tiny_llama, 2)
    assert upper.available
    body = tiny_llama.model.base_model
    with torch.no_grad():
        full = body(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        h = upper.residual(ids, mask)
        with upper.sliced():
            assert len(body.layers) == 2
            part = body(inputs_embeds=h, attention_mask=mask, use_cache=False).last_hidden_state
    assert len(body.layers) == 4
    assert torch.allclose(part, full, atol=1e-6, rtol=0)
