"""FT-L: fine-tuning one MLP output projection under an L-infinity constraint (Zhu et al., 2020; the "FT-L"
baseline of ROME).

    minimise  sum_i  -log P(target_new_i | prompt_i)           (teacher forcing over all target tokens)
    over W    subject to  ||W - W_0||_inf <= epsilon           (projection after every Adam step)

Only the edited layer's weight receives gradients; the rest of the model stays frozen.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from ..data.case import EditCase
from ..models.loading import LoadedModel
from .base import Editor, register_editor
from .common import encode_target


@dataclass
class FTHparams:
    layer: int = 5
    lr: float = 5e-4
    num_steps: int = 25
    norm_constraint: float = 5e-4       # epsilon of the L-inf ball around the original weights
    early_stop_loss: float = 1e-2


@register_editor
class FTL(Editor):
    name = "ft"
    Hparams = FTHparams
    supports_batch = True

    def edited_parameters(self, lm: LoadedModel) -> list[str]:
        return [lm.adapter.weight_name(self.hparams.layer)]

    def execute(self, lm: LoadedModel, cases: Sequence[EditCase]) -> dict[str, Any]:
        hp, tok, model = self.hparams, lm.tokenizer, lm.model
        # teacher-forced batch: prompt ids + target ids, loss on target positions only
        seqs, labels = [], []
        for c in cases:
            p, t = tok(c.rewrite_prompt).input_ids, encode_target(tok, c.target_new)
            seqs.append(p + t)
            labels.append([-100] * len(p) + t)
        T = max(map(len, seqs))
        ids = torch.full((len(seqs), T), tok.pad_token_id, dtype=torch.long)
        lab = torch.full((len(seqs), T), -100, dtype=torch.long)
        mask = torch.zeros((len(seqs), T), dtype=torch.long)
        for i, (s, l) in enumerate(zip(seqs, labels)):
            ids[i, :len(s)], lab[i, :len(l)], mask[i, :len(s)] = torch.tensor(s), torch.tensor(l), 1
        ids, lab, mask = ids.to(lm.device), lab.to(lm.device), mask.to(lm.device)

        w = lm.adapter.mlp_weight(model, hp.layer)
        w0 = w.detach().clone()
        w.requires_grad_(True)
        optimizer = torch.optim.Adam([w], lr=hp.lr)
        losses = []
        try:
            for _ in range(hp.num_steps):
                logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]   # [n, T-1, V]
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), lab[:, 1:].reshape(-1),
                                       ignore_index=-100)
                losses.append(round(loss.item(), 4))
                if loss.item() < hp.early_stop_loss:
                    break
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                with torch.no_grad():       # project back into the L-inf ball around W_0
                    w.copy_(torch.clamp(w, w0 - hp.norm_constraint, w0 + hp.norm_constraint))
        finally:
            w.requires_grad_(False)
            w.grad = None
        return {"loss": losses, "steps": len(losses), "max_abs_change": float((w - w0).abs().max())}
