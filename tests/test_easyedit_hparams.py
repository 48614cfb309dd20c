"""EasyEdit hyper-parameter files: every key lands in hparams, arch override, stats, matched or ignored (with a
warning); the ROME gpt2-xl and MEMIT llama layouts (tests/data/easyedit, written for these tests) load; a wrong file
fails in one line; the mapped hyper-parameters drive a real edit on a tiny model."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from harness.editors import HparamsError, registry
from harness.editors.easyedit_hparams import (EasyEditHparamsWarning, check_modules, map_easyedit_hparams,
                                              parse_hparams_file_option)
from harness.models import param_digest

from .conftest import make_stats

DATA = Path(__file__).parent / "data" / "easyedit"
ROME_GPT2XL = DATA / "rome-gpt2-xl.yaml"
MEMIT_LLAMA = DATA / "memit-llama.yaml"


def test_rome_gpt2_xl_file():
    with pytest.warns(EasyEditHparamsWarning) as caught:
        m = map_easyedit_hparams(ROME_GPT2XL, registry.get("rome"), n_layers=48)
    assert m.hparams == {"layer": 17, "v_num_grad_steps": 20, "v_lr": 0.5, "v_weight_decay": 0.5,
                         "clamp_norm_factor": 4, "kl_factor": 0.0625, "mom2_adjustment": False,
                         "context_template_length_params": [[5, 10], [10, 10]]}
    assert isinstance(m.hparams["v_lr"], float)                     # "5e-1" is a string to YAML 1.1
    assert m.arch_override == {"mlp_out": "transformer.h.{}.mlp.c_proj", "layers": "transformer.h.{}"}
    assert m.stats == {"stats_corpus": "wikitext", "stats_tokens": 100000}
    assert m.matched == {"fact_token": "subject_last", "v_loss_layer": 47, "mom2_dtype": "float32"}
    assert set(m.ignored) == {"model_name", "stats_dir", "device", "mlp_module_tmp", "attn_module_tmp",
                              "ln_f_module", "lm_head_module", "model_parallel", "fp16"}
    assert len(caught) == len(m.ignored)                            # one warning per ignored key
    assert all(k in str(w.message) for k, w in zip(m.ignored, caught))
    # every key of the file is accounted for exactly once
    keys = set(yaml.safe_load(ROME_GPT2XL.read_text())) - {"alg_name", "layers", "rewrite_module_tmp",
                                                              "layer_module_tmp", "mom2_n_samples", "mom2_dataset"}
    placed = [*m.hparams, *m.matched, *m.ignored]
    assert sorted(placed) == sorted(keys | {"layer"})
    json.dumps(m.record())                                          # goes into the run JSON as is


def test_memit_llama_file_and_the_loss_layer_check():
    with pytest.warns(EasyEditHparamsWarning):
        m = map_easyedit_hparams(MEMIT_LLAMA, registry.get("memit"), n_layers=30)
    assert m.hparams["layers"] == [4, 5, 6, 7, 8] and m.hparams["v_weight_decay"] == pytest.approx(1e-3)
    assert m.hparams["mom2_update_weight"] == 15000 and m.matched["mom2_adjustment"] is True
    assert "v_loss_layer" in m.ignored and "layer 29" in m.ignored["v_loss_layer"]   # 31 is not this model's last
    m32 = map_easyedit_hparams(MEMIT_LLAMA, registry.get("memit"), n_layers=32, warn=False)
    assert m32.matched["v_loss_layer"] == 31
    hp = m.build(registry.get("memit"), "llama", n_layers=30, overrides={"v_num_grad_steps": "3"})
    assert hp.layers == [4, 5, 6, 7, 8] and hp.v_num_grad_steps == 3     # --hparam wins over the file
    assert hp.mom2_update_weight == 15000 and hp.clamp_norm_factor == 4


def test_file_for_another_method_or_bad_file(tmp_path):
    with pytest.raises(HparamsError) as err:
        map_easyedit_hparams(MEMIT_LLAMA, registry.get("rome"))
    assert "\n" not in str(err.value) and "for 'MEMIT', not editor 'rome'" in str(err.value)
    assert "--hparams-file memit=" in str(err.value)
    bad = tmp_path / "bad.yaml"
    bad.write_text("layers: [1\n")
    with pytest.raises(HparamsError, match="not valid YAML"):
        map_easyedit_hparams(bad, registry.get("rome"))
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(HparamsError, match="mapping"):
        map_easyedit_hparams(bad, registry.get("rome"))
    with pytest.raises(HparamsError, match="not found"):
        map_easyedit_hparams(tmp_path / "none.yaml", registry.get("rome"))
    bad.write_text("alg_name: ROME\nlayers: [3, 4]\n")
    with pytest.raises(HparamsError, match="edits one layer"):
        map_easyedit_hparams(bad, registry.get("rome"))


def test_ft_file(tmp_path):
    p = tmp_path / "ft.yaml"
    p.write_text("alg_name: FT\nlayers: [21]\nnum_steps: 25\nlr: 5e-4\nweight_decay: 0\nkl_factor: 0\n"
                 "norm_constraint: false\nobjective_optimization: prompt_last\nbatch_size: 1\nmax_length: 40\n"
                 "rewrite_module_tmp: model.layers.{}.mlp.down_proj.weight\nmom2_dataset: books\n")
    with pytest.warns(EasyEditHparamsWarning):
        m = map_easyedit_hparams(p, registry.get("ft"))
    assert m.hparams == {"layer": 21, "num_steps": 25, "lr": 5e-4}
    assert m.arch_override == {"mlp_out": "model.layers.{}.mlp.down_proj"}         # ".weight" dropped
    assert m.matched == {"weight_decay": 0, "kl_factor": 0, "objective_optimization": "prompt_last"}
    assert {"norm_constraint", "batch_size", "max_length", "mom2_dataset"} <= set(m.ignored)
    p.write_text("alg_name: FT\nlayers: [2, 3]\nobjective_optimization: target_new\nnorm_constraint: 0.002\n")
    with pytest.warns(EasyEditHparamsWarning, match="FT-M"):
        m = map_easyedit_hparams(p, registry.get("ft"))
    assert m.hparams == {"layers": [2, 3], "norm_constraint": 0.002}


def test_module_templates_are_checked_against_the_model(tiny_gpt2, tiny_llama):
    m = map_easyedit_hparams(ROME_GPT2XL, registry.get("rome"), warn=False)
    check_modules(m, tiny_gpt2.model, tiny_gpt2.n_layers)                           # the gpt2 names exist
    with pytest.raises(HparamsError) as err:
        check_modules(m, tiny_llama.model, tiny_llama.n_layers)
    assert "\n" not in str(err.value) and "rewrite_module_tmp" in str(err.value) and "LlamaForCausalLM" in str(err.value)


def test_mapped_memit_file_edits_a_tiny_llama(tiny_llama, tmp_path):
    lm = tiny_llama
    data = yaml.safe_load(MEMIT_LLAMA.read_text())
    data.update(layers=[1, 2], v_num_grad_steps=5, context_template_length_params=[[3, 2]])
    p = tmp_path / "memit-tiny.yaml"
    p.write_text(yaml.safe_dump(data))
    m = map_easyedit_hparams(p, registry.get("memit"), n_layers=lm.n_layers, warn=False)
    check_modules(m, lm.model, lm.n_layers)
    cls = registry.get("memit")
    editor = cls(m.build(cls, lm.adapter.family, n_layers=lm.n_layers), stats=make_stats(lm, tmp_path))
    assert editor.hparams.layers == [1, 2] and editor.hparams.v_weight_decay == pytest.approx(1e-3)
    from harness.data import load_cases
    before = param_digest(lm.model)
    edit = editor.apply(lm, load_cases("builtin")[:1])
    assert edit.changed_parameters == [f"model.layers.{i}.mlp.down_proj.weight" for i in (1, 2)]
    edit.restore()
    assert param_digest(lm.model) == before


def test_parse_option():
    assert parse_hparams_file_option("rome=hp/ROME/gpt2-xl.yaml") == ("rome", Path("hp/ROME/gpt2-xl.yaml"))
    for bad in ("rome", "=x.yaml", "rome="):
        with pytest.raises(HparamsError, match="EDITOR=PATH.yaml"):
            parse_hparams_file_option(bad)
