"""The architecture matrix (docs/models.md): a tiny random model of each decoder-only architecture below, built from
its transformers config, gets its modules from the adapter table or by structure, its default layers from the
family file or the depth rule, and a single edit of ROME, MEMIT, FT-L and GRACE through the suite's own protocol:
the edit changes the model, the restore is bit-exact and the record is complete. Mixture-of-experts models and
models whose MLP output cannot be found are refused in one line.

``python -m tests.test_arch_matrix`` prints the "Supported models" table of docs/models.md from ``ARCHS``.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from harness import protocols
from harness import provenance as prov
from harness.editors.base import family_file, layer_choice, registry
from harness.models import UnknownArchitectureError, adapter_for, from_pretrained_objects, param_digest
from harness.models.adapter import FAMILIES
from harness.session import HarnessSession, Options
from harness.timing import PhaseTimer

DOCS = Path(__file__).resolve().parents[1] / "docs" / "models.md"
EDITORS = ("rome", "memit", "ft", "grace")
# speed only (v* steps, context templates, optimiser steps): the layers stay the defaults under test
FAST = {"rome": ["v_num_grad_steps=6", "context_template_length_params=[[3,2]]"],
        "memit": ["v_num_grad_steps=6", "context_template_length_params=[[3,2]]"],
        "ft": ["num_steps=4"], "grace": ["n_iter=8"]}

_LLAMA_LIKE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=256)
_GQA16 = dict(_LLAMA_LIKE, head_dim=16)
# model_type -> (config class, config values, the MLP output projection of block 0)
ARCHS: dict[str, tuple[str, dict[str, Any], str]] = {
    "gpt2": ("GPT2Config", dict(n_embd=64, n_layer=4, n_head=4, n_positions=256), "transformer.h.0.mlp.c_proj"),
    "gptj": ("GPTJConfig", dict(n_embd=64, n_layer=4, n_head=4, n_positions=256, rotary_dim=8, n_inner=128),
             "transformer.h.0.mlp.fc_out"),
    "gpt_neox": ("GPTNeoXConfig", dict(_LLAMA_LIKE, num_key_value_heads=4, rotary_pct=0.25),
                 "gpt_neox.layers.0.mlp.dense_4h_to_h"),
    "llama": ("LlamaConfig", _LLAMA_LIKE, "model.layers.0.mlp.down_proj"),
    "mistral": ("MistralConfig", _GQA16, "model.layers.0.mlp.down_proj"),
    "qwen2": ("Qwen2Config", _LLAMA_LIKE, "model.layers.0.mlp.down_proj"),
    "qwen3": ("Qwen3Config", _GQA16, "model.layers.0.mlp.down_proj"),
    "gemma": ("GemmaConfig", _GQA16, "model.layers.0.mlp.down_proj"),
    "gemma2": ("Gemma2Config", _GQA16, "model.layers.0.mlp.down_proj"),
    "gemma3_text": ("Gemma3TextConfig", _GQA16, "model.layers.0.mlp.down_proj"),
    "phi": ("PhiConfig", dict(_LLAMA_LIKE, num_key_value_heads=4, partial_rotary_factor=0.5),
            "model.layers.0.mlp.fc2"),
    "phi3": ("Phi3Config", _LLAMA_LIKE, "model.layers.0.mlp.down_proj"),
    "olmo": ("OlmoConfig", _LLAMA_LIKE, "model.layers.0.mlp.down_proj"),
    "olmo2": ("Olmo2Config", _LLAMA_LIKE, "model.layers.0.mlp.down_proj"),
    "granite": ("GraniteConfig", _LLAMA_LIKE, "model.layers.0.mlp.down_proj"),
    "stablelm": ("StableLmConfig", dict(_LLAMA_LIKE, partial_rotary_factor=0.25), "model.layers.0.mlp.down_proj"),
    "opt": ("OPTConfig", dict(hidden_size=64, ffn_dim=128, num_hidden_layers=4, num_attention_heads=4,
                              word_embed_proj_dim=64, max_position_embeddings=256), "model.decoder.layers.0.fc2"),
    "falcon": ("FalconConfig", dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4),
               "transformer.h.0.mlp.dense_4h_to_h"),
    "bloom": ("BloomConfig", dict(hidden_size=64, n_layer=4, n_head=4), "transformer.h.0.mlp.dense_4h_to_h"),
    "codegen": ("CodeGenConfig", dict(n_embd=64, n_layer=4, n_head=4, n_positions=256, rotary_dim=8, n_inner=128),
                "transformer.h.0.mlp.fc_out"),
    "gpt_bigcode": ("GPTBigCodeConfig", dict(n_embd=64, n_layer=4, n_head=4, n_positions=256, n_inner=128),
                    "transformer.h.0.mlp.c_proj"),
    "gpt_neo": ("GPTNeoConfig", dict(hidden_size=64, num_layers=4, num_heads=4, intermediate_size=128,
                                     attention_types=[[["global", "local"], 2]], max_position_embeddings=256),
                "transformer.h.0.mlp.c_proj"),
    "starcoder2": ("Starcoder2Config", _LLAMA_LIKE, "model.layers.0.mlp.c_proj"),
    "cohere": ("CohereConfig", _LLAMA_LIKE, "model.layers.0.mlp.down_proj"),
    "mpt": ("MptConfig", dict(d_model=64, n_layers=4, n_heads=4, expansion_ratio=2, max_seq_len=256),
            "transformer.blocks.0.ffn.down_proj"),
    "persimmon": ("PersimmonConfig", dict(_LLAMA_LIKE, num_key_value_heads=4), "model.layers.0.mlp.dense_4h_to_h"),
    "nemotron": ("NemotronConfig", _GQA16, "model.layers.0.mlp.down_proj"),
    "glm": ("GlmConfig", _GQA16, "model.layers.0.mlp.down_proj"),
    "helium": ("HeliumConfig", _GQA16, "model.layers.0.mlp.down_proj"),
    "smollm3": ("SmolLM3Config", _LLAMA_LIKE, "model.layers.0.mlp.down_proj"),
    "olmo3": ("Olmo3Config", _LLAMA_LIKE, "model.layers.0.mlp.down_proj"),
    "xglm": ("XGLMConfig", dict(d_model=64, num_layers=4, attention_heads=4, ffn_dim=128,
                                max_position_embeddings=256), "model.layers.0.fc2"),
    "biogpt": ("BioGptConfig", dict(_LLAMA_LIKE, num_key_value_heads=4), "biogpt.layers.0.fc2"),
}
# found, but not yet editable: the reason (an expected failure, strict: a fix makes the matrix fail until removed)
NOT_YET: dict[str, str] = {}
# mixture-of-experts MLPs: refused at load (one line), unless --arch-override names a dense projection
MOE: dict[str, tuple[str, dict[str, Any]]] = {
    "mixtral": ("MixtralConfig", dict(_LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(_LLAMA_LIKE, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                         shared_expert_intermediate_size=64)),
}


def build(model_type: str, tokenizer, table: dict | None = None) -> nn.Module:
    """A tiny random model of ``model_type`` (seed 0), its vocabulary the tiny tokenizer's."""
    import transformers

    cls_name, values = (table or ARCHS)[model_type][:2]
    ids = dict(eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    config = getattr(transformers, cls_name)(vocab_size=len(tokenizer), **ids, **values)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def layer_overrides(model_type: str) -> list[str]:
    """The families with files set their layers for 30-48-layer models: a 4-layer model gets them by hand."""
    if all(family_file(registry.get(e), model_type) is None for e in EDITORS):
        return []
    return ["rome.layer=1", "memit.layers=[0,1]", "ft.layer=2", "grace.layer=3"]


def session_for(lm, tmp_path: Path, model: str | None = None, editors=EDITORS) -> HarnessSession:
    """A session on the already-built ``lm`` (or loading ``model``): small statistics and text sets, no generation
    metrics."""
    hparams = [f"{e}.{h}" for e in editors for h in FAST[e]]
    if lm is not None:
        hparams += layer_overrides(lm.identity["model_type"])
    h = HarnessSession(Options(model=model or lm.name, device="cpu", cache_dir=str(tmp_path / "cache"),
                               stats_tokens=1500, stats_corpus="builtin", ppl_corpus="builtin-sentences",
                               ppl_texts=3, n_cases=1, dataset="builtin", editors=list(editors), hparams=hparams,
                               wild=False, fluency=False, report_dir=str(tmp_path / "reports"), progress=False))
    if lm is not None:
        h._lm = lm                  # the model is built here, not loaded from --model
    return h


def modules(lm) -> list[tuple]:
    """Every module's name, class and hook counts, and every parameter's storage: what a restore must leave as it
    found it (``harness.editing.structure`` without the version counters, which a weight restore bumps)."""
    return ([(n, type(m).__name__, len(m._forward_hooks), len(m._forward_pre_hooks))
             for n, m in lm.model.named_modules()] + [(n, p.data_ptr()) for n, p in lm.model.named_parameters()])


def last_logits(lm, prompt: str) -> torch.Tensor:
    ids = torch.tensor([lm.tokenizer(prompt).input_ids])
    with torch.no_grad():
        return lm.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1].clone()


def watch(editor, seen: dict) -> None:
    """Wrap ``editor.apply`` to check, right after the edit, that it changed the model: the weights it declares
    (or, for GRACE, that its hook is on the MLP output projection) and the next-token logits of the prompt."""
    apply = editor.apply

    def checked(lm, cases):
        before = last_logits(lm, cases[0].rewrite_prompt)
        edit = apply(lm, cases)
        if edit.snapshot is not None:
            seen["changed"] = sorted(n for n, d in edit.snapshot.deltas().items() if bool(d.abs().sum() > 0))
        else:
            module = lm.adapter.module(lm.model, lm.adapter.mlp_name(editor.hparams.layer))
            seen["changed"] = ["hook"] if module._forward_hooks else []
        seen["logits_moved"] = not torch.equal(before, last_logits(lm, cases[0].rewrite_prompt))
        return edit

    editor.apply = checked


@pytest.mark.parametrize("model_type", [
    pytest.param(t, marks=pytest.mark.xfail(strict=True, reason=NOT_YET[t])) if t in NOT_YET else t for t in ARCHS])
def test_single_edit_on_each_architecture(model_type, tiny_tokenizer, tmp_path):
    lm = from_pretrained_objects(build(model_type, tiny_tokenizer), tiny_tokenizer, name=f"tiny-{model_type}")
    by = "table" if model_type in FAMILIES else "structure"
    assert (lm.adapter.found_by, lm.adapter.mlp_name(0), lm.n_layers) == (by, ARCHS[model_type][2], 4)
    h = session_for(lm, tmp_path)
    case = h.cases()[0]
    digest, shape = param_digest(lm.model), modules(lm)
    for name in EDITORS:
        editor, seen = h.editor(name), {}
        watch(editor, seen)
        m = protocols.single_edit(h, editor, case, PhaseTimer())
        assert seen["changed"] and seen["logits_moved"], (name, seen)
        if name != "grace":         # it wrote only what it declared (FT-L: the weight, maybe not the bias)
            assert set(seen["changed"]) <= set(editor.edited_parameters(lm)), name
        assert param_digest(lm.model) == digest and modules(lm) == shape, f"{name}: restore not bit-exact"
        assert set(m.metrics) == set(m.protocols), name
        for key in ("efficacy_success", "paraphrase_success", "neighborhood_success", "ppl_before", "ppl_after",
                    "ppl_ratio", "efficacy_success_pre"):
            assert isinstance(m.metrics.get(key), (int, float)) and math.isfinite(m.metrics[key]), (name, key)
    out = prov.collect(h)
    assert out["architecture"]["found_by"] == by and out["architecture"]["mlp_out"] == lm.adapter.mlp_out
    rome = out["editors"]["rome"]["layers"]["layer"]
    if layer_overrides(model_type):
        assert rome["source"].startswith("override")
    else:                           # no family file: the depth rule (ROME's layer 5 of 30 -> 1 of 4)
        assert (rome["value"], rome["source"]) == (1, "depth rule") and "rule" in out["editors"]["rome"]["layers"]
        assert out["editors"]["memit"]["layers"]["layers"]["value"] == [0, 1]
        assert layer_choice(h.editor("grace").hparams)["layer"]["value"] == 3


def test_structure_agrees_with_the_table(tiny_tokenizer):
    """The table's families, found by structure instead, give the same modules (the table is only an override)."""
    from harness.models.structure import detect
    for model_type, entry in FAMILIES.items():
        found = detect(build(model_type, tiny_tokenizer))
        assert (found.layers, found.mlp_out, found.attn_out, found.embed, found.transposed) == (
            entry.layers, entry.mlp_out, entry.attn_out, entry.embed, entry.transposed), model_type


@pytest.mark.parametrize("model_type", list(MOE))
def test_mixture_of_experts_is_refused_in_one_line(model_type, tiny_tokenizer):
    model = build(model_type, tiny_tokenizer, MOE)
    with pytest.raises(UnknownArchitectureError) as e:
        from_pretrained_objects(model, tiny_tokenizer)
    message = str(e.value)
    assert "\n" not in message and "mixture of experts" in message and "--arch-override 'mlp_out=" in message
    if model_type == "qwen2_moe":       # a dense projection named by hand is accepted
        a = adapter_for(model, {"mlp_out": "model.layers.{}.mlp.shared_expert.down_proj"})
        assert a.found_by == "structure+override" and a.layers == "model.layers.{}"


class _Cfg:
    model_type = "homebrew"
    hidden_size = 16
    num_hidden_layers = 2


class _Block(nn.Module):
    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.attn = nn.Linear(16, 16)
        self.mlp = mlp

    def forward(self, x):
        return x + self.mlp(x + self.attn(x))


class _Homebrew(nn.Module):
    """A custom decoder whose MLP is a raw parameter product (no linear to find), or none at all."""

    def __init__(self, mlp):
        super().__init__()
        self.config = _Cfg()
        self.embed = nn.Embedding(50, 16)
        self.blocks = nn.ModuleList(_Block(mlp()) for _ in range(2))

    def get_input_embeddings(self):
        return self.embed


class _RawMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.w_in = nn.Parameter(torch.zeros(16, 64))
        self.w_out = nn.Parameter(torch.zeros(64, 16))

    def forward(self, x):
        return torch.relu(x @ self.w_in) @ self.w_out


class _SquareMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 32), nn.Linear(16, 32)


def test_a_model_whose_mlp_output_cannot_be_found_is_refused_in_one_line():
    with pytest.raises(UnknownArchitectureError) as e:
        adapter_for(_Homebrew(_RawMLP))
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("architecture 'homebrew' (_Homebrew) is not in the adapter table and in block 0")
    assert "no linear in the MLP child 'mlp' maps back to the model width 16" in message
    assert "pass --arch-override 'mlp_out=" in message
    with pytest.raises(UnknownArchitectureError, match="no linear in the MLP child 'mlp' maps back"):
        adapter_for(_Homebrew(_SquareMLP))
    # blocks and embeddings found by structure, the MLP output named by hand
    model = _Homebrew(_SquareMLP)
    for block in model.blocks:
        block.mlp.out = nn.Linear(32, 16)
    a = adapter_for(model)
    assert (a.layers, a.mlp_out, a.attn_out, a.embed, a.found_by) == (
        "blocks.{}", "blocks.{}.mlp.out", "blocks.{}.attn", "embed", "structure")
    with pytest.raises(UnknownArchitectureError, match="no list of decoder blocks"):
        class Flat(nn.Module):
            config = _Cfg()

            def __init__(self):
                super().__init__()
                self.embed, self.mlp = nn.Embedding(50, 16), nn.Linear(64, 16)
        adapter_for(Flat())


def test_default_layers_without_a_family_file():
    from harness.editors.base import depth_scaled, load_hparams
    rome, memit, ft, grace = (registry.get(e) for e in EDITORS)
    hp = load_hparams(rome, "gemma", {}, n_layers=4)
    assert hp.layer == 1 and layer_choice(hp)["layer"] == {
        "value": 1, "source": "depth rule", "reference": "layer 5 of 30 in hparams/rome/llama.yaml"}
    assert layer_choice(load_hparams(rome, "gemma", {"layer": "2"}, n_layers=4))["layer"]["source"].startswith(
        "override")                                                   # an override wins
    files = layer_choice(load_hparams(rome, "qwen2", {}, n_layers=30))    # a family file (here by fallback) first
    assert files["layer"] == {"value": 5, "source": "hparams/rome/llama.yaml"} and "rule" not in files
    assert load_hparams(rome, "gemma", {}).layer == 5                     # no model depth: the dataclass default
    # the docs' table: 4, 12, 28, 32 layers
    assert [load_hparams(rome, "x", {}, n_layers=n).layer for n in (4, 12, 28, 32)] == [1, 2, 5, 5]
    assert [load_hparams(memit, "x", {}, n_layers=n).layers for n in (4, 12, 28, 32)] == [
        [0, 1], [1, 2, 3], [3, 4, 5, 6, 7], [3, 4, 5, 6, 7]]
    assert [load_hparams(ft, "x", {}, n_layers=n).layer for n in (4, 12, 28, 32)] == [2, 7, 18, 20]
    assert [load_hparams(grace, "x", {}, n_layers=n).layer for n in (4, 12, 28, 32)] == [3, 9, 23, 27]
    assert (depth_scaled(0, 7), depth_scaled(29, 7), depth_scaled(-1, 7), depth_scaled(5, 1)) == (0, 6, 6, 0)


def _saved(model, tokenizer, folder: Path) -> Path:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_a_saved_model_is_loaded_by_structure_and_the_run_records_how(tiny_tokenizer, tmp_path):
    """The user's path of issue 27: a gemma saved with save_pretrained, given as --model with no override; the run's
    provenance says how its modules and each editor's layers were chosen."""
    model_dir = _saved(build("gemma", tiny_tokenizer), tiny_tokenizer, tmp_path / "gemma")
    h = session_for(None, tmp_path, model=str(model_dir), editors=("rome", "memit"))
    m = protocols.single_edit(h, h.editor("rome"), h.cases()[0], PhaseTimer())
    assert m.metrics["efficacy_success"] is not None
    out = prov.collect(h)
    arch = out["architecture"]
    assert (arch["family"], arch["found_by"]) == ("gemma", "structure")
    assert arch["mlp_out"] == "model.layers.{}.mlp.down_proj"
    assert "back to the model width 64" in arch["notes"]["mlp_out"]
    assert arch["notes"]["layers"].startswith("model.layers:")
    rome, memit = out["editors"]["rome"]["layers"], out["editors"]["memit"]["layers"]
    assert rome["layer"] == {"value": 1, "source": "depth rule",
                             "reference": "layer 5 of 30 in hparams/rome/llama.yaml"}
    assert memit["layers"]["value"] == [0, 1] and memit["rule"].startswith("l = round(") and memit["n_layers"] == 4


def test_a_mixture_of_experts_model_is_refused_at_start_up_in_one_line(tiny_tokenizer, tmp_path):
    from harness.session import ModelUnavailable
    model_dir = _saved(build("mixtral", tiny_tokenizer, MOE), tiny_tokenizer, tmp_path / "mixtral")
    h = session_for(None, tmp_path, model=str(model_dir))
    with pytest.raises(ModelUnavailable) as e:
        h.lm
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"--model {model_dir}: architecture 'mixtral'")
    assert "mixture of experts" in message and "--arch-override 'mlp_out=" in message


def supported_models_table() -> str:
    """The "Supported models" table of docs/models.md, from ``ARCHS`` and ``MOE``."""
    rows = ["| architecture (`model_type`) | modules found by | MLP output projection | default layers | tested |",
            "|---|---|---|---|---|"]
    for model_type, (_, _, mlp) in ARCHS.items():
        by = "table" if model_type in FAMILIES else "structure"
        own = family_file(registry.get("rome"), model_type)
        files = f"family file `{own.name}`" if own else "depth rule"
        tested = (f"modules found; edits not yet: {NOT_YET[model_type]}" if model_type in NOT_YET else
                  "single edit: ROME, MEMIT, FT-L, GRACE")
        rows.append(f"| {model_type} | {by} | `{mlp.replace('.0.', '.{}.')}` | {files} | {tested} |")
    for model_type in MOE:
        rows.append(f"| {model_type} | refused (mixture of experts) | `--arch-override mlp_out=...` | - | refusal |")
    return "\n".join(rows)


def test_docs_table_is_generated_from_this_list():
    assert supported_models_table() in DOCS.read_text(), "regenerate it: python -m tests.test_arch_matrix"


if __name__ == "__main__":
    print(supported_models_table())
