"""Per-architecture adapters: where the MLP output projection, the residual stream and the embedding live.

Where: ``--arch-override`` first (any of the fields), then the table below (``FAMILIES``, keyed by
``config.model_type``: the families the harness was measured on), then the model's own structure
(``harness.models.structure``: block list, MLP and attention output projections, input embeddings). How each
module was chosen is kept on the adapter (``found_by``, ``notes``) and recorded in the run's provenance.

Editors speak in "linear convention": an MLP output weight is a matrix W of shape [d_out, d_in] that maps a key
k (the MLP's hidden activation, d_in) to a value v = W k (the residual-stream write, d_out). GPT-2's Conv1D keeps
the transpose, [d_in, d_out]; the adapter hides that.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from .structure import Found, StructureError, config_layers, detect


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
    found_by: str = "table"   # "table", "structure" or "override", joined with "+" when mixed
    notes: dict = field(default_factory=dict, compare=False)  # field -> how it was found (structure detection)

    # --- names ---------------------------------------------------------------------------------------
    def layer_name(self, layer: int) -> str:
        return self.layers.format(layer)

    def mlp_name(self, layer: int) -> str:
        return self.mlp_out.format(layer)

    def attn_name(self, layer: int) -> str:
        if not self.attn_out:
            raise UnknownArchitectureError(
                f"the attention output projection of family {self.family!r} was not found by structure; pass "
                "--arch-override 'attn_out=<module path with {} for the layer>'")
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

    def describe(self) -> dict:
        """The modules and how they were found, as recorded in the run's provenance (``architecture``)."""
        return {"family": self.family, "found_by": self.found_by, "layers": self.layers, "mlp_out": self.mlp_out,
                "transposed": self.transposed, "attn_out": self.attn_out or None, "embed": self.embed,
                "notes": dict(self.notes)}

    # --- modules and weights -------------------------------------------------------------------------
    def n_layers(self, model: nn.Module) -> int:
        """The number of decoder blocks: the length of the block list, else the config's count."""
        head = self.layers.split("{}", 1)[0].rstrip(".")
        try:
            blocks = model.get_submodule(head) if head else None
        except AttributeError:
            blocks = None
        if isinstance(blocks, nn.ModuleList):
            return len(blocks)
        n = config_layers(model)
        if n is None:
            raise UnknownArchitectureError("cannot tell the number of layers from the model config")
        return n

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


OVERRIDE_KEYS = ("family", "layers", "mlp_out", "attn_out", "embed", "transposed")
MODULE_KEYS = ("layers", "mlp_out", "attn_out", "embed")


def adapter_for(model: nn.Module, override: dict | None = None) -> ArchAdapter:
    """The adapter for ``model``: ``override`` fields first, then the table entry of its ``model_type``, then what
    its structure shows (``harness.models.structure``). An UnknownArchitectureError (one line: why, and what to
    pass to ``--arch-override``) when the modules cannot be found, the MLP is a mixture of experts, or a name
    does not exist in the model."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    override = dict(override or {})
    unknown = sorted(set(override) - set(OVERRIDE_KEYS))
    if unknown:
        raise UnknownArchitectureError(f"--arch-override: unknown key {unknown[0]!r}; keys: {', '.join(OVERRIDE_KEYS)}")
    if "transposed" in override and isinstance(override["transposed"], str):
        override["transposed"] = override["transposed"].lower() in ("1", "true", "yes")
    base = FAMILIES.get(model_type or "")
    if base is not None and not override and not _resolves(model, base):
        base = None                         # a table family with other module names (remote code): by structure
    if base is not None:
        base = replace(base, notes={"modules": f"the adapter table's entry for model_type {model_type!r}"})
    if base is None:
        base = _by_structure(model, model_type, override)
    if override:
        named = [k for k in override if k != "family"]
        found_by = ("override" if set(MODULE_KEYS) <= set(override) else
                    f"{base.found_by}+override" if named else base.found_by)
        notes = {**base.notes, **{k: f"--arch-override {k}={v}" for k, v in override.items()}}
        adapter = replace(base, **override, found_by=found_by, notes=notes)
    else:
        adapter = base
    for layer in sorted({0, adapter.n_layers(model) - 1}):   # fail now, not mid-edit, when a name is wrong
        adapter.module(model, adapter.mlp_name(layer))
    return adapter


def _resolves(model: nn.Module, adapter: ArchAdapter) -> bool:
    try:
        model.get_submodule(adapter.mlp_name(0))
        return True
    except AttributeError:
        return False


def _by_structure(model: nn.Module, model_type: str | None, override: dict) -> ArchAdapter:
    """An adapter from ``model``'s structure for the module fields ``override`` does not name."""
    need = tuple(k for k in MODULE_KEYS if k not in override)
    found = Found()
    if need:
        try:
            found = detect(model, need)
        except StructureError as e:
            name = model_type or type(model).__name__
            raise UnknownArchitectureError(
                f"architecture {name!r} ({type(model).__name__}) is not in the adapter table and {e}; pass "
                "--arch-override 'mlp_out=<path of a dense MLP output projection, {} for the layer>' (also layers=, "
                "attn_out=, embed= for what was not found; docs/models.md)") from None
    fields = {k: getattr(found, k) or "" for k in MODULE_KEYS}
    return ArchAdapter(family=model_type or "custom", transposed=found.transposed, found_by="structure",
                       notes=dict(found.notes), **fields)
