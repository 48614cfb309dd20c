"""Partial forward passes of a decoder: stop after a module, or run from layer L on.

An edit of layer L's weights (ROME, R-ROME) or an activation added at layer L's MLP output (the v* optimisation)
leaves every layer below L as it was, so the residual stream entering layer L (the output of layer L - 1) is the
same before and after. Two exact savings follow:

- ``stop_after(module)``: a pass that only needs a module's input/output (a key at layer L) stops there instead of
  running the layers above;
- ``layers_from(model, adapter, L)``: a pass whose input is the residual stream entering layer L (``inputs_embeds`` = the state
  captured by ``block_input``) runs only layers L.. and the final norm. The model's own forward does it: for the
  duration, its block list holds only blocks L.. (each keeps its own index, so a KV cache of the full model still
  lines up) and an additive position embedding (GPT-2's ``wpe``) adds zeros. Every block then sees the same
  inputs as in a full pass; tests/test_speed.py checks that logits and v* agree bit for bit with the full pass.

Only families whose base model is "embeddings, one plain loop over the block list, final norm" are supported
(``supports_layers_from``); anything else (per-layer mask types as in Mistral/Qwen2 sliding windows, custom
architectures) takes the full pass.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

# family -> (base model class name, additive position embedding module or None), relative to the full model
_SUPPORTED = {"llama": ("LlamaModel", None), "gpt2": ("GPT2Model", "transformer.wpe")}


class _Stop(Exception):
    """Raised by a hook to end a forward pass early."""


@contextlib.contextmanager
def stop_after(module: nn.Module) -> Iterator[None]:
    """End any forward pass right after ``module`` has run (the caller's hooks on it still fire first when they
    were registered earlier). The ``with`` block's pass ends quietly; nothing above ``module`` is computed."""
    def hook(*_):
        raise _Stop()

    handle = module.register_forward_hook(hook)
    try:
        yield
    except _Stop:
        pass
    finally:
        handle.remove()


def block_list(model: nn.Module, adapter) -> tuple[nn.Module, str, nn.ModuleList]:
    """(parent module, attribute name, the ModuleList of decoder blocks), from the adapter's ``layers`` pattern."""
    path = adapter.layers
    if not path.endswith(".{}"):
        raise ValueError(f"adapter layers pattern {path!r} does not end with '.{{}}'")
    parent_name, _, attr = path[:-3].rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    return parent, attr, getattr(parent, attr)


def supports_layers_from(model: nn.Module, adapter) -> bool:
    """Whether ``layers_from`` is exact for this model (a tested family, the expected base model class, all on one
    device: a model split over devices with ``device_map`` takes the full pass)."""
    spec = _SUPPORTED.get(adapter.family)
    split = len(set((getattr(model, "hf_device_map", None) or {}).values())) > 1
    return spec is not None and type(model.base_model).__name__ == spec[0] and not split


@contextlib.contextmanager
def block_input(model: nn.Module, adapter, layer: int) -> Iterator[dict]:
    """Capture the residual stream entering block ``layer`` ([b, T, d]) on the next forward pass, and end that pass
    there (``store["hidden"]``)."""
    _, _, blocks = block_list(model, adapter)
    store: dict = {}

    def hook(_m, args, kwargs):
        store["hidden"] = args[0] if args else kwargs["hidden_states"]
        raise _Stop()

    handle = blocks[layer].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield store
    except _Stop:
        pass
    finally:
        handle.remove()


@contextlib.contextmanager
def layers_from(model: nn.Module, adapter, layer: int) -> Iterator[None]:
    """Within the block, the base model's forward runs blocks ``layer``.. only and takes ``inputs_embeds`` as the
    residual stream entering block ``layer``. Raises ValueError for an unsupported family (check
    ``supports_layers_from`` first)."""
    if not supports_layers_from(model, adapter):
        raise ValueError(f"layers_from: family {adapter.family!r} ({type(model.base_model).__name__}) "
                         "is not supported; run the full model")
    parent, attr, blocks = block_list(model, adapter)
    pos_name = _SUPPORTED[adapter.family][1]
    handle = (model.get_submodule(pos_name).register_forward_hook(lambda _m, _i, out: torch.zeros_like(out))
              if pos_name else None)
    setattr(parent, attr, nn.ModuleList(list(blocks)[layer:]))
    try:
        yield
    finally:
        setattr(parent, attr, blocks)
        if handle is not None:
            handle.remove()


class BelowLayer:
    """The residual stream entering block ``layer`` for a fixed set of inputs, captured once and reused: the first
    ``run`` of an input is a full pass (capturing), later runs of the same input go from ``layer`` on.

    Valid only while the embeddings and the blocks below ``layer`` stay as they were at capture, e.g. across
    single edits of layer ``layer`` and above, each restored before the next (the caller's promise: the perplexity
    texts after a ROME edit, ``harness.metrics.perplexity``). Inputs are keyed by the caller and compared by their
    token ids and mask, so a different input under an old key is captured again, never mixed up."""

    def __init__(self, model: nn.Module, adapter, layer: int) -> None:
        self.model, self.adapter, self.layer = model, adapter, int(layer)
        self._inputs: dict = {}

    def usable(self) -> bool:
        return self.layer > 0 and supports_layers_from(self.model, self.adapter)

    def run(self, key, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The base model's last hidden state for ``input_ids`` [b, T] (full pass when not ``usable``)."""
        body = self.model.base_model
        if not self.usable():
            return body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        held = self._inputs.get(key)
        if held is None or not (torch.equal(held[0], input_ids) and torch.equal(held[1], attention_mask)):
            with block_input(self.model, self.adapter, self.layer) as store:
                body(input_ids=input_ids, attention_mask=attention_mask)
            held = self._inputs[key] = (input_ids, attention_mask, store["hidden"])
        with layers_from(self.model, self.adapter, self.layer):
            return body(inputs_embeds=held[2], attention_mask=attention_mask).last_hidden_state
