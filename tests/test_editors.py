"""Editors on tiny random models: the published math holds (ROME is rank one and maps its key to v*), every edit
changes the model and restore is bit-exact, a failed edit leaves no trace, and bad names/settings fail clearly."""
from __future__ import annotations

import pytest
import torch

from harness.editors import HparamsError, UnknownEditorError, build_editor, registry
from harness.editors.common import plain_key_value
from harness.models import param_digest

from .conftest import TINY_HPARAMS, make_stats


def _editor(name, lm, tmp_path=None):
    return build_editor(name, lm, TINY_HPARAMS[name], stats=make_stats(lm, tmp_path))


def test_rome_update_is_rank_one_and_maps_key_to_value(tiny_lm, builtin_cases):
    rome = _editor("rome", tiny_lm)
    case = builtin_cases[0]
    upd = rome.rank_one_update(tiny_lm, case)
    sv = torch.linalg.svdvals(upd.delta.double())
    assert sv[0] > 0 and (sv[1] / sv[0]).item() < 1e-5          # rank one up to float32 rounding
    layer = rome.hparams.layer
    edit = rome.apply(tiny_lm, [case])
    try:
        k_after, v_after = plain_key_value(tiny_lm, layer, case)
        # the layer below is untouched, so the key is the same; the edited layer now outputs v* for it
        assert torch.allclose(k_after, upd.key, atol=1e-5)
        assert torch.allclose(v_after, upd.value, atol=1e-3 * upd.value.norm().item())
    finally:
        edit.restore()


@pytest.mark.parametrize("name", ["rome", "memit", "ft"])
def test_edit_changes_weights_and_restore_is_bit_exact(name, tiny_lm, builtin_cases):
    before = param_digest(tiny_lm.model)
    editor = _editor(name, tiny_lm)
    edit = editor.apply(tiny_lm, builtin_cases[:1])
    assert edit.changed_parameters == editor.edited_parameters(tiny_lm)
    assert param_digest(tiny_lm.model) != before
    edit.restore()
    assert param_digest(tiny_lm.model) == before


def test_memit_takes_a_batch(tiny_llama, builtin_cases):
    before = param_digest(tiny_llama.model)
    edit = _editor("memit", tiny_llama).apply(tiny_llama, builtin_cases[:3])
    assert edit.case_ids == [c.case_id for c in builtin_cases[:3]]
    assert len(edit.info["update_norms"]) == 2 and all(n > 0 for n in edit.info["update_norms"])
    edit.restore()
    assert param_digest(tiny_llama.model) == before


def test_rome_refuses_a_batch(tiny_llama, builtin_cases):
    with pytest.raises(ValueError, match="one case at a time"):
        _editor("rome", tiny_llama).apply(tiny_llama, builtin_cases[:2])


def test_ft_respects_linf_constraint(tiny_llama, builtin_cases):
    ft = build_editor("ft", tiny_llama, ["layer=1", "num_steps=5", "norm_constraint=1e-3", "lr=1e-2"])
    edit = ft.apply(tiny_llama, builtin_cases[:1])
    try:
        (delta,) = edit.snapshot.deltas().values()
        assert 0 < delta.abs().max().item() <= 1e-3 + 1e-7
    finally:
        edit.restore()


def test_failed_edit_leaves_no_trace(tiny_llama, builtin_cases, monkeypatch):
    rome = _editor("rome", tiny_llama)
    before = param_digest(tiny_llama.model)

    def half_done(lm, cases):
        lm.adapter.add_to_mlp_weight(lm.model, 1, torch.ones_like(lm.adapter.weight_as_linear(lm.model, 1)))
        raise RuntimeError("boom")

    monkeypatch.setattr(rome, "execute", half_done)
    with pytest.raises(RuntimeError, match="boom"):
        rome.apply(tiny_llama, builtin_cases[:1])
    assert param_digest(tiny_llama.model) == before


def test_unknown_editor_lists_available():
    with pytest.raises(UnknownEditorError) as e:
        registry.get("nope")
    assert "available: " in str(e.value) and "rome" in str(e.value) and "memit" in str(e.value)


def test_bad_hparams(tiny_llama):
    with pytest.raises(HparamsError, match="no hyper-parameter 'lyer'"):
        build_editor("rome", tiny_llama, ["rome.lyer=1"])
    with pytest.raises(HparamsError, match="does not exist in a 4-layer model"):
        build_editor("rome", tiny_llama, ["rome.layer=9"])
    assert build_editor("rome", tiny_llama, ["layer=-1"]).hparams.layer == 3
    # an unprefixed key applies only to editors that have it
    assert build_editor("memit", tiny_llama, ["layer=1", "layers=[0,1]"]).hparams.layers == [0, 1]


def test_stats_are_cached_on_disk(tiny_llama, tmp_path):
    s1 = make_stats(tiny_llama, tmp_path, n_tokens=2000)
    c1 = s1.second_moment(1)
    assert s1.last_compute_seconds is not None and s1.path(1).exists()
    s2 = make_stats(tiny_llama, tmp_path, n_tokens=2000)
    c2 = s2.second_moment(1)
    assert s2.last_compute_seconds is None          # loaded, not recomputed
    assert torch.equal(c1, c2) and c1.shape == (128, 128)
    assert torch.allclose(c1, c1.T) and torch.linalg.eigvalsh(c1.double()).min() > -1e-6
    assert make_stats(tiny_llama, tmp_path, n_tokens=1000).path(1) != s1.path(1)   # keyed by sample count


def test_hook_editor_fits_the_interface(tiny_llama, builtin_cases):
    """An editor that adds a module instead of changing weights (GRACE-like) restores by removing it."""
    from harness.editors import Edit

    lm, case = tiny_llama, builtin_cases[0]
    ids = lm.tokenizer(case.rewrite_prompt, return_tensors="pt").input_ids
    clean = lm.model(ids).logits
    module = lm.adapter.module(lm.model, lm.adapter.mlp_name(1))
    handle = module.register_forward_hook(lambda m, i, o: o + 1.0)
    edit = Edit("hook", [case.case_id], undo=handle.remove)
    assert not torch.equal(lm.model(ids).logits, clean)
    edit.restore()
    assert torch.equal(lm.model(ids).logits, clean)


def test_value_loss_starts_at_the_target_nll(tiny_lm, builtin_cases):
    """At step 0 (delta = 0, no KL, no decay) the v* objective is the teacher-forced NLL of target_new after the
    prompt, averaged over its tokens: the same number an independent scorer computes."""
    from harness.editors.common import ValueOpt, optimize_value
    from harness.metrics import score_targets

    case = builtin_cases[3]
    _, _, info = optimize_value(tiny_lm, case, tiny_lm.adapter.mlp_name(1), ["{}"], ValueOpt(steps=1))
    (expected,) = score_targets(tiny_lm.model, tiny_lm.tokenizer, [case.rewrite_prompt], [case.target_new])
    assert info["v_loss"][0] == pytest.approx(expected.nll_mean, rel=1e-3)


def test_hparam_values_are_type_checked(tiny_llama):
    with pytest.raises(HparamsError, match=r"editor 'rome': hyper-parameter layer='abc' is not a valid int"):
        build_editor("rome", tiny_llama, ["rome.layer=abc"])
    with pytest.raises(HparamsError, match=r"hyper-parameter layers=5 is not a valid list"):
        build_editor("memit", tiny_llama, ["memit.layers=5"])
    with pytest.raises(HparamsError, match=r"mom2_adjustment='maybe' is not a valid bool"):
        build_editor("rome", tiny_llama, ["rome.mom2_adjustment=maybe"])
    hp = build_editor("ft_m", tiny_llama, ["layer=1", "lr=1", "norm_constraint=null"]).hparams
    assert hp.lr == 1.0 and isinstance(hp.lr, float) and hp.norm_constraint is None


def test_family_files_hold_only_overrides_and_unknown_families_fall_back():
    import yaml
    from harness.editors.base import HPARAMS_DIR, hparams_files

    rome = registry.get("rome")
    assert not list(HPARAMS_DIR.glob("*/default.yaml"))            # defaults live in the dataclasses only
    assert hparams_files(rome, "qwen2") == hparams_files(rome, "llama") == [HPARAMS_DIR / "rome" / "llama.yaml"]
    assert hparams_files(rome, "gptj") == []                       # no file: the dataclass (GPT-J reference)
    for f in HPARAMS_DIR.glob("*/*.yaml"):
        values = yaml.safe_load(f.read_text()) or {}
        cls = registry.get(f.parent.name)
        assert set(values) <= {x.name for x in __import__("dataclasses").fields(cls.Hparams)}, f
        assert f.read_text().lstrip().startswith("#"), f"{f}: say where the values come from"
