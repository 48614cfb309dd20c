"""ENCORE: Early stopping and Norm-Constrained Robust knowledge Editing (Gupta et al., 2025, "Lifelong Sequential
Knowledge Editing without Model Degradation"; EMNLP Findings 2025 as "Lifelong Knowledge Editing requires Better
Regularization").

ENCORE is MEMIT (``memit.py``: targets z at the last edit layer, keys K and residuals R spread over the edit layers)
with two regularisers, one per step of the "two-step fine-tuning" the paper reads MEMIT as:

1. Most-Probable Early Stopping (MPES), on the target optimisation. MEMIT runs gradient descent on z until the
   target's NLL is tiny (P ~ 0.95) or the steps run out, which over-optimises the edited activations. MPES stops
   at the first step at which target_new is the most probable continuation (argmax, every target token under
   teacher forcing) in every context-template prompt:

       stop at the first s with  argmax_v P(v | c_j(p) + y_<i ; z_s) = y_i   for all templates j, tokens i

2. A Frobenius-norm constraint on the update, on the weight solve. MEMIT's objective gains lambda_n ||W_hat - W||^2,
   W being the layer's weights before this edit:

       W_hat = argmin  lambda_p ||W_hat K0 - W K0||^2 + ||W_hat K - V||^2 + lambda_n ||W_hat - W||_F^2
       delta = R K^T (lambda_p C + K K^T + lambda_n I)^-1           [d, d_in]   (MEMIT's solve plus lambda_n I)

   which bounds every layer's update by its residual whatever the keys:

       ||delta||_F <= ||R||_F ||K^T (lambda_p C + K K^T + lambda_n I)^-1||_2 <= ||R||_F / (2 sqrt(lambda_n))

   (push-through identity with A = lambda_p C + lambda_n I >= lambda_n I, B = A^-1/2 K:
    K^T (A + K K^T)^-1 = (I + B^T B)^-1 B^T A^-1/2, whose singular values are s / (1 + s^2) <= 1/2 times at most
    lambda_n^-1/2). ``update_bounds`` in the edit's info is this bound, next to ``update_norms``.

Reference: the paper's code (announced in scalable-model-editing/unified-model-editing; the snapshot read here holds
the unified MEMIT/EMMET solve, ``unified_editing/unified_main.py``, whose ``update_norm_lambda`` adds
lambda_n I to lambda_p C exactly as above, but not the MPES loop). Divergences: MPES is written from the paper's
description (all target tokens must be top-1, not only the first); MEMIT's NLL threshold stays as a second stop
(MPES nearly always comes first); lambda_n for the embedded model was chosen here (``hparams/encore/llama.yaml``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..data.case import EditCase
from ..models.loading import LoadedModel
from .base import Capabilities, register_editor
from .common import ValueOpt
from .memit import MEMIT, MemitHparams


@dataclass
class EncoreHparams(MemitHparams):
    norm_lambda: float = field(default=10.0, metadata={"min": 0})  # lambda_n: weight of ||W_hat - W||_F^2
    most_probable_stop: bool = True        # MPES

    def value_opt(self) -> ValueOpt:
        opt = super().value_opt()
        opt.most_probable_stop = self.most_probable_stop
        return opt


@register_editor
class ENCORE(MEMIT):
    name = "encore"
    Hparams = EncoreHparams
    capabilities = Capabilities(needs_key_stats=True, changes="weights", batches=True, values_ahead=True)

    def __init__(self, hparams: EncoreHparams, *, stats=None):
        super().__init__(hparams, stats=stats)
        self._bounds: list[float] = []       # the current edit's per-layer norm bounds (reported in its info)

    def state(self) -> dict[str, Any]:
        """The context templates (generated from the unedited model; a resumed run must not regenerate them)."""
        return {"templates": self.context_templates.state()}

    def load_state(self, state: dict[str, Any]) -> None:
        self.context_templates.load_state(state.get("templates", {}))

    def layer_update(self, lm: LoadedModel, layer: int, K: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        """delta [d, d_in] = R K^T (lambda_p C + K K^T + lambda_n I)^-1, solved in float64."""
        if self.stats is None:
            raise ValueError("ENCORE needs key statistics (a LayerStats): pass stats=...")
        hp = self.hparams
        C = self.stats.second_moment(layer).double().to(K.device)          # [d_in, d_in]
        K, R = K.double(), R.double()                                      # [d_in, n], [d, n]
        eye = torch.eye(K.shape[0], dtype=K.dtype, device=K.device)
        adj_k = torch.linalg.solve(hp.mom2_update_weight * C + K @ K.T + hp.norm_lambda * eye, K)   # [d_in, n]
        self._bounds.append(float(R.norm()) / (2 * math.sqrt(hp.norm_lambda)))
        return (R @ adj_k.T).float()                                       # [d, d_in]

    def execute(self, lm: LoadedModel, cases: Sequence[EditCase]) -> dict[str, Any]:
        self._bounds = []
        info = super().execute(lm, cases)
        info["update_bounds"] = self._bounds
        info["mpes_steps"] = info["v_steps"]
        return info
