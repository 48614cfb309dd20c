"""Per-architecture adapters: where the MLP output projection, the residual stream and the embedding live.

Editors speak in "linear convention": an MLP output weight is a matrix W of shape [d_out, d_in] that maps a key
k (the MLP's hidden activation, d_in) to a value v = W k (the residual-stream write, d_out). GPT-2's Conv1D keeps
the transpose, [d_in, d_out]; the adapter hides that.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace

import torch
from torch import nn


class UnknownArchitectureError(ValueError):
    pass


@dataclass(frozen=True)
class ArchAdapter:
    family: str
    layers: str      # the residual stream block output, "{}" = layer index
    mlp_out: str     # the MLP output projection (the edited matrix in ROME/MEMIT)
    attn_out: str    # attention output projection
    embed: str       # token embedding
    transposed: bool = False  # True for GPT-2's Conv1D (weight stored [d_in, d_out])

    # --- names ---------------------------------------------------------------------------------------
    def layer_name(self, layer: int) -> str:
        return self.layers.format(layer)

    def mlp_name(self, layer: int) -> str:
        return self.mlp_out.format(layer)

    def attn_name(self, layer: int) -> str:
        return self.attn_out.format(layer)

    def weight_name(self, layer: int) -> str:
        return f"{self.mlp_name(layer)}.weight"

    def layer_of(self, name: str) -> int | None:
        """The index of the decoder block that module or parameter ``name`` belongs to (None: not in a block)."""
        head = self.layers[: self.layers.index("{}")]
        if not name.startswith(head):
            return None
        index = name[len(head):].split(".", 1)[0]
        return int(index) if index.isdigit() else None

    # --- modules and weights -------------------------------------------------------------------------
    @staticmethod
    def n_layers(model: nn.Module) -> int:
        cfg = model.config
        for attr in ("num_hidden_layers", "n_layer", "num_layers"):
            if hasattr(cfg, attr):
                return int(getattr(cfg, attr))
        raise UnknownArchitectureError("cannot tell the number of layers from the model config")

    def module(self, model: nn.Module, name: str) -> nn.Module:
        try:
            return model.get_submodule(name)
        except AttributeError as e:
            raise UnknownArchitectureError(
                f"module {name!r} not found in {type(model).__name__}; pass --arch-override to name the modules"
            ) from e

    def mlp_weight(self, model: nn.Module, layer: int) -> nn.Parameter:
        return self.module(model, self.mlp_name(layer)).weight

    def weight_as_linear(self, model: nn.Module, layer: int) -> torch.Tensor:
        """The edited matrix as a [d_out, d_in] view (no copy)."""
        w = self.mlp_weight(model, layer)
        return w.T if self.transposed else w

    def to_stored(self, delta_out_in: torch.Tensor) -> torch.Tensor:
        """A [d_out, d_in] update in the parameter's stored layout."""
        return delta_out_in.T if self.transposed else delta_out_in

    @torch.no_grad()
    def add_to_mlp_weight(self, model: nn.Module, layer: int, delta_out_in: torch.Tensor) -> None:
        w = self.mlp_weight(model, layer)
        w.add_(self.to_stored(delta_out_in).to(device=w.device, dtype=w.dtype))


_LLAMA = ArchAdapter("llama", "model.layers.{}", "model.layers.{}.mlp.down_proj",
                     "model.layers.{}.self_attn.o_proj", "model.embed_tokens")
FAMILIES: dict[str, ArchAdapter] = {
    "gpt2": ArchAdapter("gpt2", "transformer.h.{}", "transformer.h.{}.mlp.c_proj",
                        "transformer.h.{}.attn.c_proj", "transformer.wte", transposed=True),
    "gptj": ArchAdapter("gptj", "transformer.h.{}", "transformer.h.{}.mlp.fc_out",
                        "transformer.h.{}.attn.out_proj", "transformer.wte"),
    "gpt_neox": ArchAdapter("gpt_neox", "gpt_neox.layers.{}", "gpt_neox.layers.{}.mlp.dense_4h_to_h",
                            "gpt_neox.layers.{}.attention.dense", "gpt_neox.embed_in"),
    "llama": _LLAMA,
    "mistral": replace(_LLAMA, family="mistral"),
    "qwen2": replace(_LLAMA, family="qwen2"),
    "qwen3": replace(_LLAMA, family="qwen3"),
}


def parse_override(text: str | None) -> dict[str, str] | None:
    """``--arch-override`` accepts JSON or ``key=value,key=value`` (keys: family layers mlp_out attn_out embed transposed)."""
    if not text:
        return None
    text = text.strip()
    if text.startswith("{"):
        return json.loads(text)
    out = {}
    for part in text.split(","):
        if "=" not in part:
            raise ValueError(f"--arch-override: {part!r} is not key=value; e.g. layers=model.h.{{}},mlp_out=model.h.{{}}.mlp.out")
        k, v = part.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def adapter_for(model: nn.Module, override: dict | None = None) -> ArchAdapter:
    """The adapter for ``model``'s family, with ``override`` fields replacing the defaults."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    base = FAMILIES.get(model_type or "")
    override = dict(override or {})
    if "transposed" in override and isinstance(override["transposed"], str):
        override["transposed"] = override["transposed"].lower() in ("1", "true", "yes")
    if base is None:
        needed = {"layers", "mlp_out", "attn_out", "embed"}
        if not needed <= set(override):
            raise UnknownArchitectureError(
                f"unknown architecture {model_type!r} (known: {', '.join(sorted(FAMILIES))}); pass "
                f"--arch-override 'layers=...{{}},mlp_out=...{{}},attn_out=...{{}},embed=...' naming its modules"
            )
        base = ArchAdapter(family=override.pop("family", model_type or "custom"), **{k: override.pop(k) for k in needed})
    adapter = replace(base, **override) if override else base
    adapter.module(model, adapter.mlp_name(0))  # fail now, not mid-edit, when a name is wrong
    return adapter
