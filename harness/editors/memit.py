"""MEMIT: Mass-Editing Memory in a Transformer (Meng et al., 2023).

A batch of n edits is written into the MLP output projections of several layers l in L = [l_1 .. l_last]:

    z_i   [d]        target hidden state at the last edit layer for edit i (``optimize_values`` on the residual
                     stream output of l_last; same objective as ROME's v*, each edit its own optimisation, run
                     ``value_batch`` edits to one batched pass)
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
from .base import Capabilities, Editor, register_editor
from .common import (ContextTemplates, ValueOpt, ValuesAhead, average_key, module_io_at, optimize_values,
                     subject_last_index)


@dataclass
class ZHparams:
    """The edit layers and MEMIT's z optimisation and context templates: what MEMIT and its successors
    (AlphaEdit, D4S, EMMET) share. Each adds the hyper-parameters of its own solve. Defaults: kmeng01/memit
    ``hparams/MEMIT/EleutherAI_gpt-j-6B.json`` and ``memit_main.get_context_templates`` (5 generated prefixes of
    10 tokens, one per seed word). Family files (``hparams/<editor>/<family>.yaml``) hold only what differs."""
    layers: list = field(default_factory=lambda: [3, 4, 5, 6, 7, 8])
    v_num_grad_steps: int = field(default=25, metadata={"min": 1})
    v_lr: float = field(default=0.5, metadata={"gt": 0})
    kl_factor: float = field(default=0.0625, metadata={"min": 0})
    v_weight_decay: float = field(default=0.5, metadata={"min": 0})
    clamp_norm_factor: float = field(default=0.75, metadata={"gt": 0})
    context_template_length_params: list = field(default_factory=lambda: [[10, 5]])
    context_seed_prompts: list = field(default_factory=lambda: ["The", "Therefore", "Because", "I", "You"])
    template_seed: int = 0

    def value_opt(self) -> ValueOpt:
        return ValueOpt(self.v_num_grad_steps, self.v_lr, self.kl_factor, self.v_weight_decay,
                        self.clamp_norm_factor)


@dataclass
class MemitHparams(ZHparams):
    mom2_update_weight: float = field(default=15000.0, metadata={"min": 0})     # lambda in lambda C + K K^T


def layer_keys(lm: LoadedModel, layer: int, cases: Sequence[EditCase], templates: Sequence[str],
               group_sizes: Sequence[int] | None = None) -> torch.Tensor:
    """K [d_in, n]: each subject's key at ``layer``, averaged within each template group and then across groups
    (MEMIT's ``compute_ks``: the bare prompt weighs 1/2 against the mean of the generated prefixes)."""
    return torch.stack([average_key(lm, layer, c, templates, group_sizes) for c in cases], dim=1)


def hidden_at_subjects(lm: LoadedModel, layer: int, cases: Sequence[EditCase]) -> torch.Tensor:
    """h [d, n]: residual stream after ``layer`` at each subject's last token of the bare prompt."""
    idxs = [subject_last_index(lm.tokenizer, c.prompt, c.subject) for c in cases]
    _, out = module_io_at(lm, lm.adapter.layer_name(layer), [c.rewrite_prompt for c in cases], idxs)
    return out.T


def memit_update(C: torch.Tensor, K: torch.Tensor, R: torch.Tensor, lam: float) -> torch.Tensor:
    """delta [d, d_in] = R K^T (lambda C + K K^T)^-1  (MEMIT eq. 14, ``execute_memit``'s ``adj_k`` and ``upd_matrix``):
    the solution of the normal equations delta (lambda C + K K^T) = R K^T, in float64.

    C [d_in, d_in]  second moment of the layer's keys;  K [d_in, n] the edits' keys;  R [d, n] their residuals."""
    K, R = K.double(), R.double().to(K.device)
    adj_k = torch.linalg.solve(lam * C.double().to(K.device) + K @ K.T, K)     # [d_in, n]
    return (R @ adj_k.T).float()                                                # [d, d_in]


@register_editor
class MEMIT(Editor):
    name = "memit"
    Hparams = MemitHparams
    capabilities = Capabilities(needs_key_stats=True, changes="weights", batches=True, values_ahead=True)

    def __init__(self, hparams: MemitHparams, *, stats=None, value_batch: int | None = None):
        super().__init__(hparams, stats=stats)
        self.context_templates = ContextTemplates(hparams)   # context_templates(lm) -> the model's templates
        # edits whose z are optimised in one batched pass (``optimize_values``; 1: one at a time, slower batched on
        # CPU at one thread, docs/speed.md). A setting of the computation, not of the method (the z agree within
        # float rounding), so not a hyper-parameter: None follows ``--vstar-batch`` (``self.ahead.batch``, set by the
        # session's ``AheadPlan``)
        self.value_batch = value_batch
        self.ahead = ValuesAhead()   # z of the next single edits in one batch (``--vstar-batch``; off by default)

    def prepare(self, lm: LoadedModel) -> None:
        self.context_templates(lm)   # generated by the unedited model, once per model
        if self.stats is not None:
            self.stats.second_moments(self.hparams.layers)   # one-off cost, outside any edit's timing

    def edited_parameters(self, lm: LoadedModel) -> list[str]:
        return [lm.adapter.weight_name(layer) for layer in self.hparams.layers]

    def keys(self, lm: LoadedModel, layer: int, cases: Sequence[EditCase]) -> torch.Tensor:
        """K [d_in, n] at ``layer`` (``layer_keys`` over this editor's template groups)."""
        return layer_keys(lm, layer, cases, self.context_templates(lm), self.context_templates.groups())

    def target_values(self, lm: LoadedModel, cases: Sequence[EditCase]) -> tuple[torch.Tensor, list[dict]]:
        """Z [d, n]: z_i at the last edit layer's output, optimised per edit, ``value_batch`` edits to a pass."""
        templates, k = self.context_templates(lm), max(1, int(self.value_batch or self.ahead.batch))
        name, opt = lm.adapter.layer_name(self.hparams.layers[-1]), self.hparams.value_opt()
        if len(cases) == 1:          # a single edit: maybe optimised ahead, with the next ones (``ValuesAhead``)
            z, _, info = self.ahead.value(lm, cases[0], name, templates, opt, self.edited_parameters(lm))
            return z[:, None], [info]
        out = [r for s in range(0, len(cases), k) for r in optimize_values(lm, cases[s:s + k], name, templates, opt)]
        return torch.stack([z for z, _, _ in out], dim=1), [info for _, _, info in out]

    def layer_update(self, lm: LoadedModel, layer: int, K: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        """delta [d, d_in] = R K^T (lambda C + K K^T)^-1, solved as a linear system in float64."""
        if self.stats is None:
            raise ValueError("MEMIT needs key statistics (a LayerStats): pass stats=...")
        return memit_update(self.stats.second_moment(layer), K, R, self.hparams.mom2_update_weight)

    def execute(self, lm: LoadedModel, cases: Sequence[EditCase]) -> dict[str, Any]:
        hp = self.hparams
        Z, infos = self.target_values(lm, cases)                          # [d, n]
        norms = []
        for i, layer in enumerate(hp.layers):
            K = self.keys(lm, layer, cases)                              # [d_in, n]
            R = Z - hidden_at_subjects(lm, hp.layers[-1], cases)         # [d, n]
            R = R / (len(hp.layers) - i)                                 # spread over the remaining layers
            delta = self.layer_update(lm, layer, K, R)                   # [d, d_in]
            lm.adapter.add_to_mlp_weight(lm.model, layer, delta)
            norms.append(float(delta.norm()))
        return {"v_loss": [x["v_loss"][-1] for x in infos], "v_steps": [x["v_steps"] for x in infos],
                "v_batch": min(len(cases), max(1, int(self.value_batch or self.ahead.batch))), "update_norms": norms}
