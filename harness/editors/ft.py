"""FT-L: fine-tuning one MLP output projection under an L-infinity constraint (Zhu et al., 2020; the "FT-L"
baseline of ROME).

    minimise  sum_i  -log P(target_new_i | prompt_i)           (teacher forcing over all target tokens)
    over W    subject to  ||W - W_0||_inf <= epsilon           (projection after every Adam step)

Only the edited layer's weight receives gradients; the rest of the model stays frozen. ``layers`` (a window of
layers, Hase et al. 2023's constrained fine-tuning over several layers) tunes each listed layer's weight instead.
A case's ``objective`` replaces the NLL term as in ``common.objective_loss`` ("erase" lowers P(target), "force"
noises the subject's token embeddings during training).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from ..data.case import EditCase
from ..models.loading import LoadedModel
from .base import Editor, register_editor
from .common import encode_target, objective_loss, subject_first_index, subject_last_index, subject_noise


@dataclass
class FTHparams:
    layer: int = 5
    lr: float = 5e-4
    num_steps: int = 25
    norm_constraint: float = 5e-4       # epsilon of the L-inf ball around the original weights
    early_stop_loss: float = 1e-2
    layers: list = field(default_factory=list)   # a window of layers to tune together; empty: just ``layer``


@register_editor
class FTL(Editor):
    name = "ft"
    Hparams = FTHparams
    supports_batch = True

    def tuned_layers(self) -> list[int]:
        return [int(x) for x in self.hparams.layers] or [self.hparams.layer]

    def edited_parameters(self, lm: LoadedModel) -> list[str]:
        return [lm.adapter.weight_name(layer) for layer in self.tuned_layers()]

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

        objectives = {c.objective for c in cases}
        if len(objectives) > 1:
            raise ValueError(f"FT-L edits a batch with one objective; got {sorted(objectives)}")
        (objective,) = objectives
        objective_loss(torch.zeros(1), objective)        # an unknown objective fails before training
        inputs: dict = {"input_ids": ids}
        if objective == "force":                         # fixed noise on each prompt's subject token embeddings
            with torch.no_grad():
                emb = model.get_input_embeddings()(ids).clone()               # [n, T, d]
            for i, c in enumerate(cases):
                first, last = (subject_first_index(tok, c.prompt, c.subject),
                               subject_last_index(tok, c.prompt, c.subject))
                emb[i, first:last + 1] += subject_noise(c, [last + 1 - first], emb.shape[-1], emb.device,
                                                        emb.dtype)[0]
            inputs = {"inputs_embeds": emb}
        n_tgt = (lab[:, 1:] != -100).sum(1)                                     # [n] target tokens per case

        weights = [lm.adapter.mlp_weight(model, layer) for layer in self.tuned_layers()]
        originals = [w.detach().clone() for w in weights]
        for w in weights:
            w.requires_grad_(True)
        optimizer = torch.optim.Adam(weights, lr=hp.lr)
        losses = []
        try:
            for _ in range(hp.num_steps):
                logits = model(**inputs, attention_mask=mask).logits[:, :-1]   # [n, T-1, V]
                if objective == "rewrite":   # the reference's token-mean cross-entropy, kept bit for bit
                    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), lab[:, 1:].reshape(-1),
                                           ignore_index=-100)
                else:                        # per case mean token NLL [n], then the objective's term
                    tok_nll = F.cross_entropy(logits.transpose(1, 2).float(), lab[:, 1:], ignore_index=-100,
                                              reduction="none")                 # [n, T-1], 0 off-target
                    loss = objective_loss(tok_nll.sum(1) / n_tgt, objective)
                losses.append(round(loss.item(), 4))
                if objective != "erase" and loss.item() < hp.early_stop_loss:   # an NLL threshold: erasure runs on
                    break
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                with torch.no_grad():       # project back into the L-inf ball around W_0
                    for w, w0 in zip(weights, originals):
                        w.copy_(torch.clamp(w, w0 - hp.norm_constraint, w0 + hp.norm_constraint))
        finally:
            for w in weights:
                w.requires_grad_(False)
                w.grad = None
        return {"loss": losses, "steps": len(losses),
                "max_abs_change": max(float((w - w0).abs().max()) for w, w0 in zip(weights, originals))}
