"""Snapshot and restore of exactly the parameters an editor changes; restore is bit-exact."""
from __future__ import annotations

import hashlib

import torch
from torch import nn


class WeightSnapshot:
    """Copies of the named parameters, taken before an edit. ``restore()`` writes them back in place."""

    def __init__(self, model: nn.Module, names: list[str]):
        params = dict(model.named_parameters())
        missing = [n for n in names if n not in params]
        if missing:
            raise KeyError(f"no parameter named {missing[0]!r} in {type(model).__name__}")
        self._model = model
        self.saved: dict[str, torch.Tensor] = {n: params[n].detach().clone() for n in dict.fromkeys(names)}

    @property
    def names(self) -> list[str]:
        return list(self.saved)

    @torch.no_grad()
    def restore(self) -> None:
        params = dict(self._model.named_parameters())
        for n, t in self.saved.items():
            params[n].copy_(t)

    @torch.no_grad()
    def deltas(self) -> dict[str, torch.Tensor]:
        """Current value minus the saved one, per parameter (what the edits added)."""
        params = dict(self._model.named_parameters())
        return {n: params[n].detach() - t for n, t in self.saved.items()}


def param_digest(model: nn.Module, names: list[str] | None = None) -> str:
    """SHA-256 over the raw bytes of the parameters (all, or ``names``): equal digests mean bit-equal weights."""
    h = hashlib.sha256()
    for n, p in model.named_parameters():
        if names is None or n in names:
            h.update(n.encode())
            h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names and raw bytes of a dict of tensors, in name order (e.g. a checkpoint's saved weights)."""
    h = hashlib.sha256()
    for n in sorted(tensors):
        h.update(n.encode())
        h.update(tensors[n].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
