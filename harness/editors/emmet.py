"""EMMET: Equality-constrained Mass Model Editing in a Transformer (Gupta, Sajnani, Anumanchipalli, 2024,
"A Unified Framework for Model Editing").

ROME and MEMIT solve the same preservation-memorization objective with different constraints: MEMIT trades the new
facts off against the preserved keys (least squares), ROME makes a single new fact an equality constraint. EMMET
makes a whole batch of n new facts equality constraints:

    minimise   lambda || (W_hat - W_0) K_0 ||^2            (preserve the keys of general text)
    subject to W_hat K_E = V_E                               (memorize every edit exactly)

whose closed form (Lagrange multipliers) is, per edit layer l, with MEMIT's keys and residuals:

    K   [d_in, n]     keys of the n edits at layer l, averaged over the context templates (MEMIT's ``layer_keys``)
    R   [d, n]        z_i - h_i at the last edit layer, spread evenly over the remaining layers (exactly MEMIT's)
    C   [d_in, d_in]  lambda E[k k^T] (+ mu I, ``update_norm_lambda``, the paper's optional norm term)
    D   [n, n]        K^T C^-1 K  (+ emmet_lambda I when n > 1, against an ill-conditioned D)
    delta = R D^-1 K^T C^-1                                  [d, d_in]   (EMMET eq. 9)

so that delta K = R: each edit's residual is written exactly (up to emmet_lambda). With n = 1 and one layer
this is ROME's rank-one update with MEMIT's target; the batch size is where EMMET and MEMIT differ.

Reference: scalable-model-editing/unified-model-editing, ``emmet/emmet_main.py`` (``execute_emmet``: the
``C_inv``, ``D``, ``D_inv`` and ``adj_k`` lines) and ``hparams/EMMET/{gpt2-xl,llama2-7b}.json``.
Everything else (z optimisation, keys, residual spreading, context templates) is MEMIT's, inherited.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .base import Capabilities, register_editor
from .memit import MEMIT, MemitHparams


@dataclass
class EmmetHparams(MemitHparams):
    """Defaults: unified-model-editing ``hparams/EMMET/gpt2-xl.json``."""
    layers: list = field(default_factory=lambda: [17])
    v_num_grad_steps: int = field(default=20, metadata={"min": 1})
    mom2_update_weight: float = field(default=1000.0, metadata={"min": 0})  # lambda in C = lambda E[k k^T]
    emmet_lambda: float = field(default=0.1, metadata={"min": 0})  # ridge on D = K^T C^-1 K for batches (n > 1)
    update_norm_lambda: float = field(default=0.0, metadata={"min": 0})  # mu: C += mu I (0 in every published setting)


def emmet_update(C: torch.Tensor, K: torch.Tensor, R: torch.Tensor, lam: float, emmet_lambda: float = 0.0,
                 update_norm_lambda: float = 0.0) -> torch.Tensor:
    """delta [d, d_in] = R D^-1 K^T C'^-1 with C' = lambda C (+ mu I), D = K^T C'^-1 K (+ emmet_lambda I when
    n > 1): EMMET eq. 9 (``execute_emmet``), in float64 with linear solves. delta K = R when emmet_lambda = 0.

    C [d_in, d_in];  K [d_in, n];  R [d, n]."""
    K, R = K.double(), R.double().to(K.device)
    Cw = lam * C.double().to(K.device)                                          # [d_in, d_in]
    if update_norm_lambda:
        Cw = Cw + update_norm_lambda * torch.eye(Cw.shape[0], dtype=Cw.dtype, device=Cw.device)
    C_inv_K = torch.linalg.solve(Cw, K)                                         # [d_in, n]  C^-1 K
    D = K.T @ C_inv_K                                                           # [n, n]
    if D.shape[0] > 1:
        D = D + emmet_lambda * torch.eye(D.shape[0], dtype=D.dtype, device=D.device)
    adj = torch.linalg.solve(D, C_inv_K.T)                                      # [n, d_in]  D^-1 K^T C^-1
    return (R @ adj).float()                                                    # [d, d_in]


@register_editor
class EMMET(MEMIT):
    name = "emmet"
    Hparams = EmmetHparams
    capabilities = Capabilities(needs_key_stats=True, changes="weights", batches=True, values_ahead=True)

    def layer_update(self, lm, layer: int, K: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        """delta [d, d_in] = R D^-1 K^T C^-1 with D = K^T C^-1 K, in float64 with linear solves."""
        if self.stats is None:
            raise ValueError("EMMET needs key statistics (a LayerStats): pass stats=...")
        hp = self.hparams
        return emmet_update(self.stats.second_moment(layer), K, R, hp.mom2_update_weight, hp.emmet_lambda,
                            hp.update_norm_lambda)
