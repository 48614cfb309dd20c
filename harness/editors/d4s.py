"""D4S, "Dump for Sequence" (Huang, Liu, Wang and Liu, NeurIPS 2024, "Reasons and Solutions for the Decline in
Model Performance after Editing").

Sequential MEMIT (``memit.py``) adds each edit's update on top of the previous ones,

    W_n = W_0 + sum_i R_i K_i^T (lambda C + K_i K_i^T)^-1,

and the norm of the edited layers grows with n, which the paper identifies as the cause of the model's decline.
A batch edit of all n facts would instead solve once, with every edit's keys in the normal equations:

    W_n = W_0 + (sum_i R_i K_i^T) (lambda C + sum_i K_i K_i^T)^-1.

D4S turns sequential editing into that batch edit with O(1) memory: per edit layer l it keeps two running sums

    S_RK  = sum_i R_i K_i^T     [d, d_in]       S_KK = sum_i K_i K_i^T     [d_in, d_in]

and every edit re-solves the layer from the original weights W_0 (not from the current, already edited ones):

    z_i   [d, n_i]     target hidden states at the last edit layer (``optimize_values``, as MEMIT), optimised on the
                       model with the edit layers at W_0
    R_i   [d, n_i]     z_i - h_i(W_0): the residual at the last edit layer relative to W_0, computed once per edit
    for each layer l in L = [l_1 .. l_last], in order:
      K_i   [d_in, n_i]  the subjects' keys at l (averaged over context templates; earlier layers already re-solved)
      S_RK <- S_RK + R_i K_i^T ;  S_KK <- S_KK + K_i K_i^T
      delta_l = S_RK (lambda C + S_KK)^-1 / (|L| - position of l)                [d, d_in]
      W_l     = W_0,l + delta_l

After edits 1..n the edited layers hold exactly what one batch edit of 1..n from W_0 would write (the keys of
every layer but the first aside: an edit's keys at a later layer are taken with the earlier layers as re-solved
at its own time), and the update's norm stays that of a single batch solve. Unlike ``memit.py`` (the original
MEMIT, which measures the residual again after each layer is written), R_i is measured once, as the official code
does: layer l gets S_RK / (|L| - position), the last layer the whole residual, so for a single edit D4S writes
more than MEMIT into the later layers.

Reference: the official code, nlpkeg/D4S (EasyEdit's MEMIT with running sums): ``easyeditor/models/memit/
memit_main.py`` (``execute_memit``: ``targets = zs - cur_zs`` computed once, before the layer loop; the caches
``r_cache += targets K^T`` and ``right_cache += K K^T``; ``upd = solve(right_cache + lambda C, r_cache / (|L| - i),
left=False)``; ``W = weights_copy + upd``) and ``easyeditor/editors/editor.py`` with ``keep_original_weight=True``
(``examples/run_zsre_llama2.py``): the model is put back to its original weights after every edit, so each edit's
z_i, R_i and K_i are measured on W_0 and the edited model is W_0 + delta. Here the editor does the same itself:
it holds W_0 (captured at its first edit after ``reset()``) and the sums, and writes W_0 + delta at every edit.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from ..data.case import EditCase
from ..models.loading import LoadedModel
from .base import Capabilities, register_editor
from .memit import MEMIT, MemitHparams, hidden_at_subjects


def _checksum(t: torch.Tensor) -> tuple[float, float]:
    """A cheap fingerprint of a weight (its sum and sum of squares in float64), to notice outside changes."""
    t = t.detach().double()
    return float(t.sum()), float(t.square().sum())


def d4s_update(C: torch.Tensor, S_RK: torch.Tensor, S_KK: torch.Tensor, lam: float, share: int = 1) -> torch.Tensor:
    """delta [d, d_in] = S_RK (lambda C + S_KK)^-1 / share, in float64 (``execute_memit`` with running sums).
    C, S_KK [d_in, d_in];  S_RK [d, d_in]."""
    A = lam * C.double().to(S_KK.device) + S_KK.double()                        # [d_in, d_in], symmetric
    return torch.linalg.solve(A, S_RK.double() / share, left=False).float()     # X A = S_RK / share


@register_editor
class D4S(MEMIT):
    name = "d4s"
    Hparams = MemitHparams
    capabilities = Capabilities(needs_key_stats=True, changes="weights", batches=True, values_ahead=True)

    def __init__(self, hparams: MemitHparams, *, stats=None):
        super().__init__(hparams, stats=stats)
        self._w0: dict[int, torch.Tensor] = {}        # layer -> W_0 in the parameter's stored layout
        self._s_rk: dict[int, torch.Tensor] = {}      # layer -> S_RK [d, d_in], float64
        self._s_kk: dict[int, torch.Tensor] = {}      # layer -> S_KK [d_in, d_in], float64
        self._written: dict[int, tuple[float, float]] = {}  # layer -> checksum of what this editor last wrote
        self._n_edits = 0                             # cases in the sums

    def reset(self) -> None:
        """Forget W_0 and the sums: the next edit starts a new sequence from the model as it is then."""
        self._w0.clear()
        self._s_rk.clear()
        self._s_kk.clear()
        self._written.clear()
        self._n_edits = 0

    def state(self) -> dict[str, Any]:
        """W_0, the sums and the context templates (a sequential run's checkpoint holds the edited weights beside
        them)."""
        return {"w0": dict(self._w0), "s_rk": dict(self._s_rk), "s_kk": dict(self._s_kk), "n_edits": self._n_edits,
                "templates": self.context_templates.state()}

    def load_state(self, state: dict[str, Any]) -> None:
        """Resume a sequence from ``state()``; the model must hold the weights saved with it."""
        self.reset()
        self._w0.update(state.get("w0", {}))
        self._s_rk.update(state.get("s_rk", {}))
        self._s_kk.update(state.get("s_kk", {}))
        self._n_edits = int(state.get("n_edits", 0))
        self.context_templates.load_state(state.get("templates", {}))

    # --- state across edits ----------------------------------------------------------------------------
    def original_weights(self, lm: LoadedModel) -> dict[int, torch.Tensor]:
        """W_0 per layer (stored layout): captured at the first edit after reset(); later, checked to be the base
        of what the model holds (an outside change to the edited layers without reset() would be lost)."""
        if not self._w0:
            return {layer: lm.adapter.mlp_weight(lm.model, layer).detach().clone() for layer in self.hparams.layers}
        for layer in self.hparams.layers:
            written = self._written.get(layer)        # None right after load_state(): trust the restored model
            if written is not None and _checksum(lm.adapter.mlp_weight(lm.model, layer)) != written:
                raise RuntimeError(
                    f"d4s: layer {layer}'s weights changed since this editor's last edit, without reset(); D4S "
                    f"re-solves every edit from the weights it saw first, so call reset() after restoring the model")
        return self._w0

    # --- the math ------------------------------------------------------------------------------------
    def layer_solve(self, layer: int, S_RK: torch.Tensor, S_KK: torch.Tensor, share: int) -> torch.Tensor:
        """delta [d, d_in] = S_RK (lambda C + S_KK)^-1 / share, solved in float64."""
        if self.stats is None:
            raise ValueError("D4S needs key statistics (a LayerStats): pass stats=...")
        return d4s_update(self.stats.second_moment(layer), S_RK, S_KK, self.hparams.mom2_update_weight, share)

    def execute(self, lm: LoadedModel, cases: Sequence[EditCase]) -> dict[str, Any]:
        hp, adapter = self.hparams, lm.adapter
        w0 = self.original_weights(lm)
        with torch.no_grad():                         # measure this edit on the original weights
            for layer in hp.layers:
                adapter.mlp_weight(lm.model, layer).copy_(w0[layer])
        Z, infos = self.target_values(lm, cases)                                # [d, n] on W_0
        R = Z.double() - hidden_at_subjects(lm, hp.layers[-1], cases).double()  # [d, n], relative to W_0, once
        s_rk, s_kk, norms = {}, {}, []
        for i, layer in enumerate(hp.layers):
            K = self.keys(lm, layer, cases).double()                # [d_in, n]
            s_rk[layer] = R @ K.T                                                # [d, d_in]
            s_kk[layer] = K @ K.T                                                # [d_in, d_in]
            if layer in self._s_rk:                                              # the earlier edits' sums
                s_rk[layer] += self._s_rk[layer].to(K.device)
                s_kk[layer] += self._s_kk[layer].to(K.device)
            delta = self.layer_solve(layer, s_rk[layer], s_kk[layer], len(hp.layers) - i)  # [d, d_in]
            with torch.no_grad():                     # W_l = W_0,l + delta_l
                w = adapter.mlp_weight(lm.model, layer)
                w.copy_((w0[layer].to(w.device).float() + adapter.to_stored(delta).to(w.device)).to(w.dtype))
            norms.append(float(delta.norm()))
        # commit the new state only now: a failed edit (restored by apply) leaves the sums as they were
        self._w0 = w0
        self._s_rk.update(s_rk)
        self._s_kk.update(s_kk)
        self._written = {layer: _checksum(adapter.mlp_weight(lm.model, layer)) for layer in hp.layers}
        self._n_edits += len(cases)
        return {"v_loss": [x["v_loss"][-1] for x in infos], "v_steps": [x["v_steps"] for x in infos],
                "delta_norms": norms, "edits_in_sums": self._n_edits}   # ||W_l - W_0,l|| per layer
