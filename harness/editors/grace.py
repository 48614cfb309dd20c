"""GRACE: General Retrieval Adaptors for Continual Editing (Hartvigsen et al., NeurIPS 2023, "Aging with GRACE:
Lifelong Model Editing with Discrete Key-Value Adaptors").

GRACE leaves every weight alone. It wraps one layer's MLP output projection f (x [d_in] -> f(x) [d_out]) with a
codebook that grows with the edits:

    K    [n, d_in]    keys: the layer's input at the edited prompts' last token
    V    [n, d_out]   values: what the layer outputs instead for inputs near a key (trained per edit)
    eps  [n]          deferral radii
    labels [n]        each key's edit target (conflicting edits split their radii)

At inference, for each token position t with layer input x_t:

    i* = argmin_i ||x_t - K_i||_2,   d* = ||x_t - K_i*||_2
    out_t = V_i*  if d* <= eps_i*  else  f(x_t)

so an input outside every radius is computed by f alone: bit for bit the unedited model.

An edit (prompt p, target y) takes the query x* = the layer input at p's last token, then (iteration 0 of the
reference):

    no key, or d* > eps_init + eps_i*       add (x*, v_0, eps_init, y)                       a new entry
    d* within reach, label of i* == y       eps_i* <- max(eps_i*, d*)  ("coverage")          the entry grows
    d* within reach, other label            add (x*, v_0, d*/2);  eps_i* <- d*/2 - 1e-5      the two split

and trains the value of the entry x* now falls in (new or grown) with Adam on the teacher-forced NLL of y after p
(v_0 ~ U[0, 1): the reference's "cold" initialisation).

Reference: Hartvigsen et al.'s code (github Thartvigsen/GRACE, ``grace/editors/grace.py``) and zjunlp/EasyEdit
``easyeditor/models/grace/GRACE.py`` (settings ``hparams/GRACE/llama-7b.yaml``: down_proj of layer 27, eps 1.0,
Adam lr 1.0, 50 steps, cold values, replace_last, coverage). Divergences, each deliberate:

- every token position is a query (the references use one position per sequence, the last prompt token, carried
  from the edit into later calls as sticky ``key_id`` state): the layer is then a function of each token's own input,
  independent of batching, padding and of where the prompt sits in a longer scored sequence, and the training
  forward pass is the evaluation forward pass;
- the codebook lives in a forward hook on the module rather than in a module swapped into the model: the model's
  module tree and parameters never change, and removing the hook restores it exactly;
- labels compare target strings (the references compare the mean of the label token ids);
- training stops early once the NLL is below ``early_stop_loss`` (the reference config names early stopping as
  GRACE's regulariser, ``reg: early_stop``, while its loop runs all ``n_iter`` steps); ``early_stop_loss: 0``
  restores the reference;
- only the chosen entry's value is trained (the reference optimises every value that the training pass touches);
- the cold value is drawn from a generator seeded with ``seed`` and the edit count (the reference uses the global
  RNG), so runs are reproducible.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from ..data.case import EditCase
from ..models.loading import LoadedModel
from .base import Capabilities, Edit, Editor, register_editor
from .common import as_btd, capture_io, encode_target, objective_loss, token_grid


@dataclass
class GraceHparams:
    layer: int = 27                 # the MLP output projection of this layer is wrapped
    eps: float = field(default=1.0, metadata={"gt": 0})  # initial deferral radius (Euclidean, in the layer-input space)
    edit_lr: float = field(default=1.0, metadata={"gt": 0})
    n_iter: int = field(default=50, metadata={"min": 1})
    early_stop_loss: float = field(default=1e-2, metadata={"min": 0})   # 0: run all n_iter steps, as the reference
    # "cold": U[0, 1) as the reference; "warm": the layer's own output at the key
    val_init: str = field(default="cold", metadata={"choices": ("cold", "warm")})
    # "coverage" (grow the radius) or "moving_average" (also move the key halfway)
    eps_expand: str = field(default="coverage", metadata={"choices": ("coverage", "moving_average")})
    seed: int = 0


class Codebook:
    """GRACE's keys, values, radii and labels (plain tensors and lists: ``state()`` saves them as they are)."""

    def __init__(self) -> None:
        self.keys = torch.empty(0)                  # [n, d_in]
        self.values = torch.empty(0)                # [n, d_out]
        self.eps = torch.empty(0)                   # [n]
        self.labels: list[str] = []
        self.edit_ids: list[str] = []
        self.training: tuple[int, torch.Tensor] | None = None   # (row, trainable value) while an edit trains

    def __len__(self) -> int:
        return len(self.labels)

    def copy(self) -> "Codebook":
        out = Codebook()
        out.keys, out.values, out.eps = self.keys.clone(), self.values.clone(), self.eps.clone()
        out.labels, out.edit_ids = list(self.labels), list(self.edit_ids)
        return out

    def state(self) -> dict[str, Any]:
        return {"keys": self.keys, "values": self.values, "eps": self.eps, "labels": list(self.labels),
                "edit_ids": list(self.edit_ids)}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "Codebook":
        out = cls()
        out.keys, out.values, out.eps = state["keys"], state["values"], state["eps"]
        out.labels, out.edit_ids = list(state["labels"]), list(state["edit_ids"])
        return out

    def nearest(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(d* [m], i* [m]) for inputs x [m, d_in]: the distance to the nearest key and its index."""
        d = torch.cdist(x.float(), self.keys.to(device=x.device, dtype=torch.float32))   # [m, n]
        return d.min(dim=1)

    def value_table(self) -> torch.Tensor:
        """V [n, d_out]; while an edit trains, its row is the trainable value (so gradients reach it)."""
        if self.training is None:
            return self.values
        row, v = self.training
        return torch.cat([self.values[:row], v[None], self.values[row + 1:]])

    def add(self, key: torch.Tensor, value: torch.Tensor, eps: float, label: str, edit_id: str) -> int:
        key, value = key.detach().float().cpu()[None], value.detach().float().cpu()[None]
        self.keys = key if not len(self) else torch.cat([self.keys, key])
        self.values = value if not len(self) else torch.cat([self.values, value])
        self.eps = torch.cat([self.eps.float(), torch.tensor([float(eps)])])
        self.labels.append(label)
        self.edit_ids.append(edit_id)
        return len(self) - 1


def _replace_hook(codebook: Codebook):
    """The forward hook: each token whose input lies within a key's radius gets that key's value as output."""
    def hook(_module, inputs, output):
        if not len(codebook):
            return output
        x = inputs[0]                                                      # [..., d_in]
        d, idx = codebook.nearest(x.reshape(-1, x.shape[-1]))              # [m], [m]
        eps = codebook.eps.to(d.device)[idx]
        hit = (d <= eps).reshape(output.shape[:-1] + (1,))                 # [..., 1]
        if not bool(hit.any()):
            return output                                                  # nothing within a radius: f(x) as is
        values = codebook.value_table().to(device=output.device, dtype=output.dtype)[idx]
        return torch.where(hit, values.reshape(output.shape), output)
    return hook


@register_editor
class GRACE(Editor):
    name = "grace"
    Hparams = GraceHparams
    capabilities = Capabilities(needs_key_stats=False, changes="hooks", batches=False, values_ahead=False)
    objectives = ("rewrite", "amplify", "erase")    # not "force": the edit keys on the clean prompt

    def __init__(self, hparams: GraceHparams, *, stats=None):
        super().__init__(hparams, stats=stats)
        self.codebook = Codebook()
        self._lm: LoadedModel | None = None      # the model the hook is (or will be) attached to
        self._handle = None                      # the forward hook's handle while attached
        self._n_edits = 0

    # --- the hook's lifecycle -----------------------------------------------------------------------------
    def prepare(self, lm: LoadedModel) -> None:
        self._lm = lm
        if len(self.codebook):
            self._attach(lm)

    def _attach(self, lm: LoadedModel) -> None:
        self._lm = lm
        if self._handle is None:
            module = lm.adapter.module(lm.model, lm.adapter.mlp_name(self.hparams.layer))
            self._handle = module.register_forward_hook(_replace_hook(self.codebook))

    def _detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    @property
    def attached(self) -> bool:
        return self._handle is not None

    def reset(self) -> None:
        """Remove the adaptor and forget the codebook (the model is then exactly the unedited model)."""
        self._detach()
        self.codebook = Codebook()
        self._n_edits = 0

    def state(self) -> dict[str, Any]:
        return {"codebook": self.codebook.state(), "n_edits": self._n_edits}

    def load_state(self, state: dict[str, Any]) -> None:
        self.reset()
        if state.get("codebook"):
            self.codebook = Codebook.from_state(state["codebook"])
            self._n_edits = int(state.get("n_edits", len(self.codebook)))
            if self._lm is not None and len(self.codebook):
                self._attach(self._lm)          # a resumed run is edited again as soon as it is loaded

    def edited_parameters(self, lm: LoadedModel) -> list[str]:
        return []                               # no weight changes

    # --- the edit -----------------------------------------------------------------------------------------
    def apply(self, lm: LoadedModel, cases: Sequence[EditCase]) -> Edit:
        if len(cases) != 1:
            raise ValueError(f"editor {self.name!r} edits one case at a time; use --batch-size 1")
        (case,) = cases
        if case.objective == "force":
            raise ValueError("GRACE keys its codebook on the clean prompt; the fact-forcing problem (noised "
                             "subject) does not apply to it")
        before = self.codebook.copy()
        self._attach(lm)
        t0 = time.perf_counter()
        try:
            info = self.execute(lm, cases)
        except BaseException:
            self._restore(before)               # a failed edit leaves no trace
            raise
        return Edit(self.name, [case.case_id], undo=lambda: self._restore(before), info=info,
                    seconds=time.perf_counter() - t0)

    def _restore(self, codebook: Codebook) -> None:
        """Back to ``codebook`` (taken before an edit); with no entry left the hook is removed. The hook holds
        ``self.codebook``, so the entries are copied into it (a copy: later edits change it in place)."""
        saved = codebook.copy()
        self.codebook.keys, self.codebook.values, self.codebook.eps = saved.keys, saved.values, saved.eps
        self.codebook.labels, self.codebook.edit_ids = saved.labels, saved.edit_ids
        self.codebook.training = None
        if not len(self.codebook):
            self._detach()

    def execute(self, lm: LoadedModel, cases: Sequence[EditCase]) -> dict[str, Any]:
        (case,) = cases
        ids, n_prompt = self._sequence(lm, case)
        module = lm.adapter.module(lm.model, lm.adapter.mlp_name(self.hparams.layer))
        with torch.no_grad(), capture_io(module) as io:
            lm.model(input_ids=ids[:, :n_prompt])
        grid = token_grid(ids[:, :n_prompt])                                # (1, P); OPT's fc2 sees [P, d]
        query = as_btd(io["input"], *grid)[0, n_prompt - 1].float()         # [1, P, d_in] -> x* [d_in]
        row, action, dist = self.insert(query, as_btd(io["output"], *grid)[0, n_prompt - 1], case)
        losses = self.train_value(lm, row, ids, n_prompt, case)
        return {"loss": losses, "steps": len(losses), "action": action, "distance": dist,
                "n_keys": len(self.codebook), "radius": float(self.codebook.eps[row])}

    def _sequence(self, lm: LoadedModel, case: EditCase) -> tuple[torch.Tensor, int]:
        """Prompt + target token ids [1, P + t] (teacher forcing) and the prompt length P."""
        p = lm.tokenizer(case.rewrite_prompt).input_ids
        t = encode_target(lm.tokenizer, case.target_new)
        return torch.tensor([p + t], device=lm.device), len(p)

    def insert(self, query: torch.Tensor, own_output: torch.Tensor, case: EditCase) -> tuple[int, str, float]:
        """Add or grow the codebook entry for ``query`` (the rules in the module docstring): (row, action, d*)."""
        hp, cb = self.hparams, self.codebook
        self._n_edits += 1
        gen = torch.Generator().manual_seed(hp.seed * 100003 + self._n_edits)
        v0 = (torch.rand(own_output.shape[-1], generator=gen) if hp.val_init == "cold"
              else own_output.detach().float().cpu())
        if not len(cb):
            return cb.add(query, v0, hp.eps, case.target_new, case.case_id), "add", float("nan")
        d, i = cb.nearest(query[None])
        d, i = float(d[0]), int(i[0])
        if d > hp.eps + float(cb.eps[i]):
            return cb.add(query, v0, hp.eps, case.target_new, case.case_id), "add", d
        if cb.labels[i] != case.target_new:     # a conflict: both radii stop half way
            row = cb.add(query, v0, d / 2, case.target_new, case.case_id)
            cb.eps[i] = d / 2 - 1e-5
            return row, "split", d
        if d > float(cb.eps[i]):
            cb.eps[i] = d
            if hp.eps_expand == "moving_average":
                cb.keys[i] = 0.5 * cb.keys[i] + 0.5 * query.cpu()
        return i, "expand", d

    def train_value(self, lm: LoadedModel, row: int, ids: torch.Tensor, n_prompt: int,
                    case: EditCase) -> list[float]:
        """Adam on V_row: mean NLL of the target tokens (or the case's objective) with the adaptor in place."""
        hp, cb = self.hparams, self.codebook
        v = cb.values[row].to(lm.device).clone().requires_grad_(True)      # [d_out]
        optimizer = torch.optim.Adam([v], lr=hp.edit_lr)
        gold = ids[0, n_prompt:]                                            # [t]
        head, body = lm.model.get_output_embeddings(), lm.model.base_model
        cb.training = (row, v)
        losses: list[float] = []
        try:
            for _ in range(hp.n_iter):
                hidden = body(input_ids=ids).last_hidden_state[0, n_prompt - 1:-1]        # [t, d_model]
                nll = F.cross_entropy(head(hidden).float(), gold)                          # mean over target tokens
                loss = objective_loss(nll[None], case.objective)
                losses.append(round(loss.item(), 4))
                if case.objective != "erase" and loss.item() < hp.early_stop_loss:
                    break
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        finally:
            cb.training = None
        cb.values[row] = v.detach().float().cpu()
        return losses
