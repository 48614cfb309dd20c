"""MEMIT: Mass-Editing Memory in a Transformer (Meng et al., 2023).

A batch of n edits is written into the MLP output projections of several layers l in L = [l_1 .. l_last]:

    z_i   [d]        target hidden state at the last edit layer for edit i (``optimize_value`` on the residual
                     stream output of l_last; same objective as ROME's v*)
    for each layer l in L, in order (weights of earlier layers already updated):
      K   [d_in, n]  keys of the n subjects at layer l, averaged over context templates
      R   [d, n]     residual still missing: z_i - h_i^{l_last}(current weights), spread evenly over the
                     remaining layers: R / (|L| - position of l)
      C   [d_in, d_in] second moment of layer l's keys on general text, weighted by lambda (mom2_update_weight)
      delta = R K^T (lambda C + K K^T)^-1        [d, d_in]   (MEMIT eq. 14)
      W_l <- W_l + delta
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..data.case import EditCase
from ..models.loading import LoadedModel
from .base import Editor, register_editor
from .common import (ValueOpt, average_key, generate_context_templates, module_io_at, optimize_value,
                     subject_last_index)


@dataclass
class MemitHparams:
    layers: list = field(default_factory=lambda: [3, 4, 5, 6, 7])
    mom2_update_weight: float = 15000.0
    v_num_grad_steps: int = 25
    v_lr: float = 0.5
    kl_factor: float = 0.0625
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 0.75
    context_template_length_params: list = field(default_factory=lambda: [[10, 5]])
    context_seed_prompts: list = field(default_factory=lambda: ["The", "Therefore", "Because", "I", "You"])
    template_seed: int = 0

    def value_opt(self) -> ValueOpt:
        return ValueOpt(self.v_num_grad_steps, self.v_lr, self.kl_factor, self.v_weight_decay,
                        self.clamp_norm_factor)


def layer_keys(lm: LoadedModel, layer: int, cases: Sequence[EditCase], templates: Sequence[str]) -> torch.Tensor:
    """K [d_in, n]: each subject's key at ``layer``, averaged over the context templates."""
    return torch.stack([average_key(lm, layer, c, templates) for c in cases], dim=1)


def hidden_at_subjects(lm: LoadedModel, layer: int, cases: Sequence[EditCase]) -> torch.Tensor:
    """h [d, n]: residual stream after ``layer`` at each subject's last token of the bare prompt."""
    idxs = [subject_last_index(lm.tokenizer, c.prompt, c.subject) for c in cases]
    _, out = module_io_at(lm, lm.adapter.layer_name(layer), [c.rewrite_prompt for c in cases], idxs)
    return out.T


@register_editor
class MEMIT(Editor):
    name = "memit"
    Hparams = MemitHparams
    supports_batch = True

    def __init__(self, hparams: MemitHparams, *, stats=None):
        super().__init__(hparams, stats=stats)
        self._templates: dict[str, list[str]] = {}

    def context_templates(self, lm: LoadedModel) -> list[str]:
        key = lm.identity.get("fingerprint", "")
        if key not in self._templates:
            hp = self.hparams
            self._templates[key] = generate_context_templates(
                lm, hp.context_template_length_params, hp.context_seed_prompts, seed=hp.template_seed)
        return self._templates[key]

    def edited_parameters(self, lm: LoadedModel) -> list[str]:
        return [lm.adapter.weight_name(layer) for layer in self.hparams.layers]

    def target_values(self, lm: LoadedModel, cases: Sequence[EditCase]) -> tuple[torch.Tensor, list[dict]]:
        """Z [d, n]: z_i at the last edit layer's output, optimised per edit."""
        templates = self.context_templates(lm)
        zs, infos = [], []
        for case in cases:
            z, _, info = optimize_value(lm, case, lm.adapter.layer_name(self.hparams.layers[-1]), templates,
                                        self.hparams.value_opt())
            zs.append(z)
            infos.append(info)
        return torch.stack(zs, dim=1), infos

    def layer_update(self, lm: LoadedModel, layer: int, K: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        """delta [d, d_in] = R K^T (lambda C + K K^T)^-1, solved as a linear system in float64."""
        if self.stats is None:
            raise ValueError("MEMIT needs key statistics (a LayerStats): pass stats=...")
        C = self.stats.second_moment(layer).double()                     # [d_in, d_in]
        K, R = K.double(), R.double()
        adj_k = torch.linalg.solve(self.hparams.mom2_update_weight * C + K @ K.T, K)  # [d_in, n]
        return (R @ adj_k.T).float()                                     # [d, d_in]

    def execute(self, lm: LoadedModel, cases: Sequence[EditCase]) -> dict[str, Any]:
        hp = self.hparams
        templates = self.context_templates(lm)
        Z, infos = self.target_values(lm, cases)                          # [d, n]
        norms = []
        for i, layer in enumerate(hp.layers):
            K = layer_keys(lm, layer, cases, templates)                  # [d_in, n]
            R = Z - hidden_at_subjects(lm, hp.layers[-1], cases)         # [d, n]
            R = R / (len(hp.layers) - i)                                 # spread over the remaining layers
            delta = self.layer_update(lm, layer, K, R)                   # [d, d_in]
            lm.adapter.add_to_mlp_weight(lm.model, layer, delta)
            norms.append(float(delta.norm()))
        return {"v_loss": [x["v_loss"][-1] for x in infos], "v_steps": [x["v_steps"] for x in infos],
                "update_norms": norms}
