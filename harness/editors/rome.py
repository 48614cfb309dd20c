"""ROME: Rank-One Model Editing (Meng et al., 2022, "Locating and Editing Factual Associations in GPT").

The MLP output projection W [d_out, d_in] of one layer is treated as a linear associative memory W k = v. To make
the subject's key k* recall a new value v*, ROME solves

    minimise ||W' K - V||  subject to  W' k* = v*,     with C = K K^T (second moment of keys, estimated once)

whose closed form is the rank-one update (eq. 2 of the paper)

    W' = W + (v* - W k) (C^-1 k*)^T / ((C^-1 k*)^T k)

    k*  [d_in]   key at the subject's last token, averaged over model-generated context prefixes (eq. 3)
    v*  [d_out]  value optimised so the model predicts the new target (eq. 4, ``optimize_value``)
    k   [d_in]   the key that must map to v*: in the reference implementation, the key of the bare prompt
                 (no prefix). R-ROME (``r_rome.py``) uses k* here instead.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple, Sequence

import torch

from ..data.case import EditCase
from ..models.loading import LoadedModel
from .base import Editor, register_editor
from .common import ValueOpt, average_key, generate_context_templates, optimize_value, plain_key_value


@dataclass
class RomeHparams:
    layer: int = 5
    v_num_grad_steps: int = 20
    v_lr: float = 0.5
    kl_factor: float = 0.0625
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    mom2_adjustment: bool = True            # whiten the key direction with C^-1 (as the reference does)
    context_template_length_params: list = field(default_factory=lambda: [[5, 10], [10, 10]])
    context_seed_prompts: list = field(default_factory=lambda: ["The", "Therefore", "Because", "I", "You"])
    template_seed: int = 0

    def value_opt(self) -> ValueOpt:
        return ValueOpt(self.v_num_grad_steps, self.v_lr, self.kl_factor, self.v_weight_decay,
                        self.clamp_norm_factor)


class RankOneUpdate(NamedTuple):
    delta: torch.Tensor   # [d_out, d_in], rank one
    key: torch.Tensor     # [d_in]  the key that now maps to v*
    value: torch.Tensor   # [d_out] v*
    info: dict


@register_editor
class ROME(Editor):
    name = "rome"
    Hparams = RomeHparams

    def __init__(self, hparams: RomeHparams, *, stats=None):
        super().__init__(hparams, stats=stats)
        self._templates: dict[str, list[str]] = {}   # model fingerprint -> context templates (generated once)

    def context_templates(self, lm: LoadedModel) -> list[str]:
        key = lm.identity.get("fingerprint", "")
        if key not in self._templates:
            hp = self.hparams
            self._templates[key] = generate_context_templates(
                lm, hp.context_template_length_params, hp.context_seed_prompts, seed=hp.template_seed)
        return self._templates[key]

    def edited_parameters(self, lm: LoadedModel) -> list[str]:
        return [lm.adapter.weight_name(self.hparams.layer)]

    # --- the math ------------------------------------------------------------------------------------
    def left_vector(self, lm: LoadedModel, k_star: torch.Tensor) -> torch.Tensor:
        """u = C^-1 k* / ||C^-1 k*||  [d_in]."""
        u = k_star
        if self.hparams.mom2_adjustment:
            if self.stats is None:
                raise ValueError("ROME with mom2_adjustment needs key statistics (a LayerStats); "
                                 "pass stats=... or set --hparam rome.mom2_adjustment=false")
            C = self.stats.second_moment(self.hparams.layer).double()           # [d_in, d_in]
            u = torch.linalg.solve(C, k_star.double()).float()                  # [d_in]
        return u / u.norm()

    def target_key(self, lm: LoadedModel, case: EditCase, k_star: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(k, W k + b): the key that must map to v*, and the layer's current output for it. Reference ROME:
        the bare prompt's key."""
        return plain_key_value(lm, self.hparams.layer, case)

    def rank_one_update(self, lm: LoadedModel, case: EditCase) -> RankOneUpdate:
        hp, layer = self.hparams, self.hparams.layer
        templates = self.context_templates(lm)
        k_star = average_key(lm, layer, case, templates)                         # [d_in]
        u = self.left_vector(lm, k_star)                                        # [d_in]
        v_star, _, info = optimize_value(lm, case, lm.adapter.mlp_name(layer), templates, hp.value_opt())  # [d_out]
        k, current = self.target_key(lm, case, k_star)                          # [d_in], [d_out]
        right = (v_star - current) / torch.dot(k, u)                            # [d_out]
        delta = torch.outer(right, u)                                           # [d_out, d_in], rank one
        info.update(update_norm=float(delta.norm()), key_cosine=float(torch.nn.functional.cosine_similarity(
            k, k_star, dim=0)))
        return RankOneUpdate(delta, k, v_star, info)

    def execute(self, lm: LoadedModel, cases: Sequence[EditCase]) -> dict[str, Any]:
        (case,) = cases
        update = self.rank_one_update(lm, case)
        lm.adapter.add_to_mlp_weight(lm.model, self.hparams.layer, update.delta)
        return update.info
