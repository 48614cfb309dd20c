"""AlphaEdit: Null-Space Constrained Knowledge Editing for Language Models (Fang et al., ICLR 2025).

MEMIT (``memit.py``) trades the new facts off against the preserved ones through lambda C in its normal equations,
so every edit disturbs the preserved knowledge a little and sequential edits pile the disturbance up. AlphaEdit
instead projects the update onto the (approximate) null space of the preserved keys K0, so that
(W + delta) K0 ~= W K0, and only solves for the new keys (and, in sequential editing, for not undoing the earlier
edits' keys K_p).

Per edit layer l (the edited matrix W [d, d_in] maps keys k [d_in] to values [d]):

    C    = E[k k^T] = K0 K0^T / n        [d_in, d_in]  second moment of the layer's keys on general text
    C    = U diag(s) U^T                                (SVD; C is symmetric PSD, so this is its eigen-decomposition)
    U^   = the columns of U with s < nullspace_threshold   [d_in, r]
    P    = U^ U^^T                       [d_in, d_in]  projector onto the null space of K0: P K0 ~= 0
    K1   [d_in, n]   keys of the n new edits at layer l (averaged over the context templates, as MEMIT)
    R    [d, n]      residual at the last edit layer, spread over the remaining layers (exactly MEMIT's)
    K_p K_p^T        [d_in, d_in]  the accumulated keys of earlier edits (a per-layer cache, 0 before the first)

    delta = R K1^T P (K_p K_p^T P + K1 K1^T P + alpha I)^-1                                       [d, d_in]

(the paper writes I where the official code has alpha I, alpha being the hyper-parameter ``L2``), solved as the
official code does:

    delta^T = (P (K1 K1^T + K_p K_p^T) + alpha I)^-1 P K1 R^T                                     [d_in, d]

delta^T lies in the range of P (alpha delta^T = P (K1 R^T - (K1 K1^T + K_p K_p^T) delta^T)), so delta = delta P
and delta k0 = 0 for every key k0 in the span of C's large-eigenvalue directions (the preserved knowledge).
After all layers are written, each layer's keys of the new edits (recomputed on the edited model) join the cache:

    K_p K_p^T <- K_p K_p^T + K1 K1^T

Note that lambda C does not appear in the solve: the projection replaces MEMIT's preservation term.

Reference: jianghoucheng/AlphaEdit, ``AlphaEdit/AlphaEdit_main.py`` (``apply_AlphaEdit_to_model``: the solve and
the ``cache_c`` update) and ``experiments/evaluate.py`` (``get_project``: SVD of the raw second moment, singular
values below ``hparams.nullspace_threshold``); settings from ``hparams/AlphaEdit/Llama3-8B.json``.
The projectors depend only on the model and C, so they are cached per model fingerprint; the key cache belongs to
the edit sequence and ``reset()`` clears it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..data.case import EditCase
from ..models.loading import LoadedModel
from .base import Capabilities, register_editor
from .memit import MEMIT, ZHparams


@dataclass
class AlphaEditHparams(ZHparams):
    """Defaults: jianghoucheng/AlphaEdit ``hparams/AlphaEdit/Llama3-8B.json`` (MEMIT's z settings otherwise)."""
    layers: list = field(default_factory=lambda: [4, 5, 6, 7, 8])
    # singular values of C below this span the preserved keys' null space
    nullspace_threshold: float = field(default=2e-2, metadata={"gt": 0})
    L2: float = field(default=10.0, metadata={"min": 0})  # alpha, the ridge term of the solve
    v_lr: float = field(default=0.1, metadata={"gt": 0})


def null_space_projector(C: torch.Tensor, threshold: float) -> torch.Tensor:
    """P = U^ U^^T [d_in, d_in] (float32): the projector onto the span of C's singular vectors with singular values
    below ``threshold`` (``get_project``). C is symmetric PSD, so its SVD is its eigen-decomposition."""
    eigenvalues, U = torch.linalg.eigh(C.double())                              # C = U diag(s) U^T
    U_hat = U[:, eigenvalues.abs() < threshold]                                 # [d_in, r]
    return (U_hat @ U_hat.T).float()


def alphaedit_update(P: torch.Tensor, KpKp: torch.Tensor, K: torch.Tensor, R: torch.Tensor, L2: float) -> torch.Tensor:
    """delta [d, d_in] with delta^T = (P (K1 K1^T + K_p K_p^T) + L2 I)^-1 P K1 R^T (``apply_AlphaEdit_to_model``),
    in float64. P [d_in, d_in], KpKp [d_in, d_in], K [d_in, n], R [d, n]. delta (I - P) = 0."""
    K, R = K.double(), R.double().to(K.device)
    P, KpKp = P.double().to(K.device), KpKp.double().to(K.device)
    d_in = K.shape[0]
    lhs = P @ (K @ K.T + KpKp) + L2 * torch.eye(d_in, dtype=K.dtype, device=K.device)
    delta_T = torch.linalg.solve(lhs, P @ K @ R.T)                              # [d_in, d]
    return delta_T.T.float()                                                    # [d, d_in]


@register_editor
class AlphaEdit(MEMIT):
    """MEMIT's edit loop (targets z, per-layer keys and residuals) with AlphaEdit's per-layer solve."""

    name = "alphaedit"
    Hparams = AlphaEditHparams
    capabilities = Capabilities(needs_key_stats=True, changes="weights", batches=True, values_ahead=True)

    def __init__(self, hparams: AlphaEditHparams, *, stats=None):
        super().__init__(hparams, stats=stats)
        self._projectors: dict[tuple[str, int, float], torch.Tensor] = {}  # (fingerprint, layer, threshold) -> P
        self._prev_kk: dict[int, torch.Tensor] = {}                        # layer -> K_p K_p^T [d_in, d_in]
        self._n_cached = 0                                                 # edits whose keys are in K_p

    def reset(self) -> None:
        """Forget the earlier edits' keys (the projectors depend only on the model and stay cached)."""
        self._prev_kk.clear()
        self._n_cached = 0

    def state(self) -> dict[str, Any]:
        """The earlier edits' keys K_p K_p^T per layer, and the context templates (generated from the model at the
        first edit: a resumed run must not generate them again from the edited model). The projectors are
        recomputed from C when needed."""
        return {"prev_kk": dict(self._prev_kk), "n_cached": self._n_cached, "templates": self.context_templates.state()}

    def load_state(self, state: dict[str, Any]) -> None:
        self.reset()
        self._prev_kk.update(state.get("prev_kk", {}))
        self._n_cached = int(state.get("n_cached", 0))
        self.context_templates.load_state(state.get("templates", {}))

    # --- the math ------------------------------------------------------------------------------------
    def null_space_projector(self, lm: LoadedModel, layer: int) -> torch.Tensor:
        """P = U^ U^^T [d_in, d_in] (float32, like C): the projector onto the span of C's singular vectors whose
        singular values are below ``nullspace_threshold``."""
        key = (lm.identity.get("fingerprint", ""), layer, float(self.hparams.nullspace_threshold))
        if key not in self._projectors:
            if self.stats is None:
                raise ValueError("AlphaEdit needs key statistics (a LayerStats): pass stats=...")
            self._projectors[key] = null_space_projector(self.stats.second_moment(layer),
                                                         self.hparams.nullspace_threshold)
        return self._projectors[key]

    def previous_keys(self, layer: int, d_in: int, device) -> torch.Tensor:
        """K_p K_p^T [d_in, d_in] (float64): the keys of the edits made since the last reset()."""
        if layer not in self._prev_kk:
            return torch.zeros(d_in, d_in, dtype=torch.float64, device=device)
        return self._prev_kk[layer].to(device)

    def layer_update(self, lm: LoadedModel, layer: int, K: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        """delta [d, d_in] = R K1^T P (K_p K_p^T P + K1 K1^T P + L2 I)^-1, solved in float64 as
        delta^T = (P (K1 K1^T + K_p K_p^T) + L2 I)^-1 P K1 R^T."""
        P = self.null_space_projector(lm, layer)                                # [d_in, d_in]
        KpKp = self.previous_keys(layer, K.shape[0], K.device)                  # [d_in, d_in]
        return alphaedit_update(P, KpKp, K, R, self.hparams.L2)

    def execute(self, lm: LoadedModel, cases: Sequence[EditCase]) -> dict[str, Any]:
        info = super().execute(lm, cases)           # MEMIT's loop, with the projected solve above at each layer
        # the new keys join K_p, each layer's taken on the fully edited model (as the official code does);
        # committed only once all layers are done, so a failed edit leaves the cache as it was
        new_kk = {}
        for layer in self.hparams.layers:
            K = self.keys(lm, layer, cases).double()                # [d_in, n]
            new_kk[layer] = self.previous_keys(layer, K.shape[0], K.device) + K @ K.T   # [d_in, d_in]
        self._prev_kk.update(new_kk)
        self._n_cached += len(cases)
        info["nullspace_dims"] = [self.nullspace_dim(lm, layer) for layer in self.hparams.layers]
        info["edits_in_cache"] = self._n_cached
        return info

    def nullspace_dim(self, lm: LoadedModel, layer: int) -> int:
        """r, the dimension of the null space P projects onto (the trace of a projector is its rank)."""
        return round(torch.trace(self.null_space_projector(lm, layer)).item())
