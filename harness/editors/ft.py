"""Fine-tuning baselines: one MLP output projection (weight and, where the model has one, bias) tuned with Adam,
optionally inside an L-infinity ball around the original weights. Two objectives, named for what they are:

``ft_l``  FT-L, ROME's baseline (kmeng01/rome ``baselines/ft/ft_main.py``; EasyEdit's ``objective_optimization:
          prompt_last``): every target token scored by the distribution at the prompt's LAST position,

              loss_i = -1/t_i sum_j log P(target_i[j] | prompt_i)         (all j read at the same position)

``ft_m``  FT-M, EasyEdit's ``objective_optimization: target_new``: the target teacher-forced after the prompt,

              loss_i = -1/t_i sum_j log P(target_i[j] | prompt_i, target_i[:j])

and for both  loss = mean_i loss_i  (``common.objective_loss``: a case's ``objective`` "erase" lowers P(target)
instead, "force" noises the subject's token embeddings). Each step (as the references):

    if loss < early_stop_loss: stop                 (the reference skips the step and ends the epoch loop)
    Adam step on the tuned parameters (lr, weight_decay)
    W <- clamp(W, W_0 - eps, W_0 + eps)             (eps = norm_constraint; None: unconstrained)

The tuned parameters are every parameter of the layer's MLP output module (the reference selects the names that
contain ``rewrite_module_tmp``: GPT-2's ``c_proj`` weight and bias, Llama's ``down_proj`` weight). ``layers``
(a window, Hase et al. 2023's constrained fine-tuning over several layers) tunes each listed layer instead of
``layer``. The references cut the cases into mini-batches of 128; here every call is one batch.

``ft`` is kept as an alias of ``ft_l`` (the baseline the README's main job and ROME's paper call FT-L): the same
editor under another name, resolved to ``ft_l`` everywhere (harness/editor_aliases.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import torch
import torch.nn.functional as F

from ..data.case import EditCase
from ..models.loading import LoadedModel
from ..tokens import pad_batch
from .base import Capabilities, Editor, register_editor
from .common import encode_target, objective_loss, subject_first_index, subject_last_index, subject_noise


@dataclass
class FTHparams:
    """Defaults: ROME's FT-L on gpt2-xl (kmeng01/rome ``hparams/FT/gpt2-xl_constr.json``; EasyEdit's
    ``hparams/FT/gpt2-xl.yaml`` has the same values for FT-L and FT-M)."""
    layer: int = 0
    layers: list = field(default_factory=list)   # a window of layers to tune together; empty: just ``layer``
    num_steps: int = field(default=25, metadata={"min": 1})
    lr: float = field(default=5e-4, metadata={"gt": 0})
    weight_decay: float = field(default=0.0, metadata={"min": 0})
    # epsilon of the L-inf ball around the original weights; null: none
    norm_constraint: float | None = field(default=5e-4, metadata={"min": 0})
    early_stop_loss: float = field(default=1e-2, metadata={"min": 0})


def mean_per_case(nll: torch.Tensor, rows: torch.Tensor, n: int) -> torch.Tensor:
    """nll [m] of target tokens belonging to cases ``rows`` [m] -> the mean per case [n]."""
    total = torch.zeros(n, dtype=nll.dtype, device=nll.device).index_add(0, rows, nll)
    count = torch.zeros(n, dtype=nll.dtype, device=nll.device).index_add(0, rows, torch.ones_like(nll))
    return total / count


class FineTune(Editor):
    """The fine-tuning loop; subclasses say where each target token is scored (``scored_positions``)."""

    Hparams = FTHparams
    capabilities = Capabilities(needs_key_stats=False, changes="weights", batches=True, values_ahead=False)
    teacher_forced: ClassVar[bool] = False

    def tuned_layers(self) -> list[int]:
        return [int(x) for x in self.hparams.layers] or [self.hparams.layer]

    def edited_parameters(self, lm: LoadedModel) -> list[str]:
        names = []
        for layer in self.tuned_layers():
            module_name = lm.adapter.mlp_name(layer)
            names += [f"{module_name}.{n}" for n, _ in lm.adapter.module(lm.model, module_name).named_parameters()]
        return names

    # --- the objective ---------------------------------------------------------------------------------
    def scored_positions(self, prompt: list[int], target: list[int]) -> tuple[list[int], list[int]]:
        """(the input sequence, the position whose distribution scores each target token)."""
        if self.teacher_forced:                       # FT-M: position p - 1 + j predicts target[j]
            return prompt + target, [len(prompt) - 1 + j for j in range(len(target))]
        return prompt, [len(prompt) - 1] * len(target)   # FT-L: every target token at the prompt's last token

    def batch(self, lm: LoadedModel, cases: Sequence[EditCase]) -> dict[str, Any]:
        """Padded inputs and, for every target token, (row, column, token id)."""
        tok = lm.tokenizer
        seqs, rows, cols, ids = [], [], [], []
        for i, c in enumerate(cases):
            target = encode_target(tok, c.target_new)
            seq, pos = self.scored_positions(tok(c.rewrite_prompt).input_ids, target)
            seqs.append(seq)
            rows += [i] * len(target)
            cols += pos
            ids += target
        input_ids, mask = pad_batch(seqs, tok.pad_token_id, device=lm.device)
        as_t = lambda x: torch.tensor(x, dtype=torch.long, device=lm.device)  # noqa: E731
        return {"input_ids": input_ids, "attention_mask": mask, "rows": as_t(rows), "cols": as_t(cols),
                "ids": as_t(ids), "n": len(cases)}

    def case_nll(self, lm: LoadedModel, batch: dict[str, Any], inputs: dict[str, Any] | None = None) -> torch.Tensor:
        """Each case's mean target-token NLL [n] at the current weights (logits only where scored)."""
        inputs = inputs or {"input_ids": batch["input_ids"]}
        hidden = lm.model.base_model(**inputs, attention_mask=batch["attention_mask"]).last_hidden_state
        logits = lm.model.get_output_embeddings()(hidden[batch["rows"], batch["cols"]]).float()   # [m, V]
        nll = -F.log_softmax(logits, dim=-1).gather(1, batch["ids"][:, None]).squeeze(1)         # [m]
        return mean_per_case(nll, batch["rows"], batch["n"])

    # --- the loop -----------------------------------------------------------------------------------------
    def execute(self, lm: LoadedModel, cases: Sequence[EditCase]) -> dict[str, Any]:
        hp, model = self.hparams, lm.model
        objectives = {c.objective for c in cases}
        if len(objectives) > 1:
            raise ValueError(f"{self.name} edits a batch with one objective; got {sorted(objectives)}")
        (objective,) = objectives
        objective_loss(torch.zeros(1), objective)        # an unknown objective fails before training
        batch = self.batch(lm, cases)
        inputs = self.noised_inputs(lm, cases, batch) if objective == "force" else None

        tuned = set(self.edited_parameters(lm))
        params = [p for n, p in model.named_parameters() if n in tuned]
        originals = [p.detach().clone() for p in params]
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay)
        losses = []
        try:
            for _ in range(hp.num_steps):
                loss = objective_loss(self.case_nll(lm, batch, inputs), objective)
                losses.append(round(loss.item(), 4))
                if objective != "erase" and loss.item() < hp.early_stop_loss:   # an NLL threshold: erasure runs on
                    break
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                if hp.norm_constraint is not None:       # project back into the L-inf ball around W_0
                    with torch.no_grad():
                        for p, p0 in zip(params, originals):
                            p.copy_(torch.clamp(p, p0 - hp.norm_constraint, p0 + hp.norm_constraint))
        finally:
            for p in params:
                p.requires_grad_(False)
                p.grad = None
        return {"loss": losses, "steps": len(losses),
                "max_abs_change": max(float((p - p0).abs().max()) for p, p0 in zip(params, originals))}

    def noised_inputs(self, lm: LoadedModel, cases: Sequence[EditCase], batch: dict[str, Any]) -> dict[str, Any]:
        """The "force" objective: fixed noise on each prompt's subject token embeddings."""
        tok = lm.tokenizer
        with torch.no_grad():
            emb = lm.model.get_input_embeddings()(batch["input_ids"]).clone()        # [n, T, d]
        for i, c in enumerate(cases):
            first, last = subject_first_index(tok, c.prompt, c.subject), subject_last_index(tok, c.prompt, c.subject)
            emb[i, first:last + 1] += subject_noise(c, [last + 1 - first], emb.shape[-1], emb.device, emb.dtype)[0]
        return {"inputs_embeds": emb}


@register_editor
class FTL(FineTune):
    """FT-L: the target scored at the prompt's last position (ROME's baseline)."""
    name = "ft_l"


@register_editor
class FTM(FineTune):
    """FT-M: the target teacher-forced after the prompt (EasyEdit)."""
    name = "ft_m"
    teacher_forced = True


# ``ft``: an alias of ``ft_l`` (harness/editor_aliases.py), resolved to ``ft_l`` wherever an editor is named: one
# editor, one set of hyper-parameters (``--hparam ft.KEY`` and ``--hparam ft_l.KEY`` alike), one name in the records
FT = FTL
