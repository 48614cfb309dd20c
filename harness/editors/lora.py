"""LoRA fine-tuning of an edit (Hu et al., ICLR 2022, "LoRA: Low-Rank Adaptation of Large Language Models"), the
fine-tuning baseline of EasyEdit and of the lifelong-editing papers (WISE, AlphaEdit, ENCORE compare against it).

The base weights W0 of the target modules stay frozen; each gets a low-rank adapter, and only the adapters train:

    h = W0 x + (alpha / r) B A x        A [r, d_in] (Kaiming-uniform init), B [d_out, r] (zero init: no change at first)
    minimise  mean over target tokens of  -log P(target_new | prompt)   (teacher forcing), by Adam on A and B

so after ``num_steps`` steps the edit lives in B A alone, and removing the adapters returns W0 bit for bit. In a
sequence of edits one adapter keeps training (the reference reuses its PEFT model across calls); undoing an edit
puts the adapter's A and B back as they were before it, and undoing the first removes the adapters.

Reference: zjunlp/EasyEdit ``easyeditor/models/lora/lora_main.py`` (``execute_lora``) through peft, settings from
``hparams/LoRA/llama-7b.yaml`` and ``gpt2-xl.yaml`` (rank 8, alpha 32, dropout 0.1, lr 5e-3, q/v projections, or
GPT-2's c_attn). peft is this harness's optional extra ``lora`` (``pip install -e '.[lora]'``). Divergences:

- plain LoRA only (the reference's llama settings pick AdaLoRA, ``lora_type: adalora``; its rank reallocation
  and orthogonality penalty are not reproduced here);
- the adapters are injected into the loaded model in place (``peft.tuners.lora.LoraModel``) and removed with
  ``unload()``, rather than wrapping the model in a ``PeftModel``; the model stays in eval mode, so dropout is
  inactive (as in the reference, which never calls ``train()``), and no gradient checkpointing is used;
- ``early_stop_loss`` (0: off, the reference) stops once the loss is below it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from ..data.case import EditCase
from ..models.loading import LoadedModel
from ..tokens import encode_target, pad_batch
from .base import Capabilities, Edit, Editor, register_editor
from .common import objective_loss


@dataclass
class LoraHparams:
    rank: int = field(default=8, metadata={"min": 1})
    lora_alpha: float = field(default=32.0, metadata={"gt": 0})
    lora_dropout: float = field(default=0.1, metadata={"min": 0, "lt": 1})
    target_modules: list = field(default_factory=lambda: ["q_proj", "v_proj"])
    layers: list = field(default_factory=list)        # layers to adapt; empty: every layer
    num_steps: int = field(default=70, metadata={"min": 1})
    lr: float = field(default=5e-3, metadata={"gt": 0})
    weight_decay: float = field(default=0.0, metadata={"min": 0})
    early_stop_loss: float = field(default=0.0, metadata={"min": 0})
    seed: int = 0                                     # the adapters' random initialisation (peft: A kaiming, B 0)


def _peft():
    try:
        from peft import LoraConfig
        from peft.tuners.lora import LoraModel
    except ImportError:
        raise ImportError("the lora editor needs peft: pip install -e '.[lora]' (or pip install peft)") from None
    return LoraConfig, LoraModel


@register_editor
class LoRA(Editor):
    name = "lora"
    Hparams = LoraHparams
    capabilities = Capabilities(needs_key_stats=False, changes="hooks", batches=True, values_ahead=False)
    objectives = ("rewrite", "amplify", "erase")    # not "force": the edit keys on the clean prompt

    def __init__(self, hparams: LoraHparams, *, stats=None):
        super().__init__(hparams, stats=stats)
        self._lm: LoadedModel | None = None
        self._tuner = None                       # the peft LoraModel while adapters are in the model
        self._pending: dict[str, torch.Tensor] | None = None   # adapter weights loaded before a model was known

    # --- adapters in and out ------------------------------------------------------------------------------
    def prepare(self, lm: LoadedModel) -> None:
        _peft()                                  # fail before the first edit when peft is missing
        self._lm = lm
        if self._pending is not None:
            self._attach(lm)
            self._set_adapter(self._pending)
            self._pending = None

    def _attach(self, lm: LoadedModel) -> None:
        if self._tuner is not None:
            return
        LoraConfig, LoraModel = _peft()
        hp = self.hparams
        config = LoraConfig(r=hp.rank, lora_alpha=hp.lora_alpha, lora_dropout=hp.lora_dropout,
                            target_modules=list(hp.target_modules), fan_in_fan_out=lm.adapter.transposed,
                            layers_to_transform=[int(x) for x in hp.layers] or None)
        self._lm = lm
        # peft draws A from the global generator: seed it here (and leave the caller's state as it was), so that an
        # edit's result does not depend on what ran before it in the process (test order, xdist worker)
        devices = list(range(torch.cuda.device_count())) if lm.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(hp.seed)
            self._tuner = LoraModel(lm.model, config, "default")      # injects the adapters in place
        lm.model.train(lm.model.training)        # new adapter modules start in train mode: follow the model (eval)
        for p in lm.model.parameters():                                # the base stays frozen (harness contract)
            p.requires_grad_(False)

    def _detach(self) -> None:
        if self._tuner is not None:
            self._tuner.unload()                 # the original modules back, base weights untouched
            self._tuner = None

    @property
    def attached(self) -> bool:
        return self._tuner is not None

    def adapter_weights(self) -> dict[str, torch.Tensor]:
        """The adapters' A and B matrices by parameter name (copies)."""
        if self._lm is None or self._tuner is None:
            return {}
        return {n: p.detach().clone() for n, p in self._lm.model.named_parameters() if ".lora_" in n}

    def _set_adapter(self, weights: dict[str, torch.Tensor]) -> None:
        params = dict(self._lm.model.named_parameters())
        with torch.no_grad():
            for n, w in weights.items():
                params[n].copy_(w.to(params[n].device))

    def reset(self) -> None:
        self._detach()
        self._pending = None

    def state(self) -> dict[str, Any]:
        return {"adapter": {n: w.cpu() for n, w in self.adapter_weights().items()}}

    def load_state(self, state: dict[str, Any]) -> None:
        self.reset()
        weights = state.get("adapter") or {}
        if not weights:
            return
        if self._lm is None:
            self._pending = weights              # attached by prepare(lm)
        else:
            self._attach(self._lm)
            self._set_adapter(weights)

    def edited_parameters(self, lm: LoadedModel) -> list[str]:
        return []                                # base weights never change

    # --- the edit -----------------------------------------------------------------------------------------
    def apply(self, lm: LoadedModel, cases: Sequence[EditCase]) -> Edit:
        objectives = {c.objective for c in cases}
        if len(objectives) > 1 or "force" in objectives:
            raise ValueError(f"LoRA edits a batch with one objective and clean prompts; got {sorted(objectives)}")
        first = self._tuner is None
        self._attach(lm)
        before = self.adapter_weights()
        t0 = time.perf_counter()

        def undo() -> None:
            if first:
                self._detach()
            elif self._tuner is not None:
                self._set_adapter(before)

        try:
            info = self.execute(lm, cases)
        except BaseException:
            undo()
            raise
        return Edit(self.name, [c.case_id for c in cases], undo=undo, info=info, seconds=time.perf_counter() - t0)

    def execute(self, lm: LoadedModel, cases: Sequence[EditCase]) -> dict[str, Any]:
        hp, tok = self.hparams, lm.tokenizer
        seqs, spans = [], []
        for c in cases:
            p, t = tok(c.rewrite_prompt).input_ids, encode_target(tok, c.target_new)
            seqs.append(p + t)
            spans.append((len(p), len(t)))
        ids, mask = pad_batch(seqs, tok.pad_token_id, device=lm.device)
        rows = torch.tensor([r for r, (_, n) in enumerate(spans) for _ in range(n)], device=lm.device)
        cols = torch.tensor([s - 1 + j for s, n in spans for j in range(n)], device=lm.device)
        gold = ids[rows, cols + 1]
        n_tgt = torch.tensor([n for _, n in spans], device=lm.device, dtype=torch.float32)
        params = [p for n, p in lm.model.named_parameters() if ".lora_" in n]
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay)
        head, body = lm.model.get_output_embeddings(), lm.model.base_model
        objective = cases[0].objective
        losses: list[float] = []
        try:
            for _ in range(hp.num_steps):
                hidden = body(input_ids=ids, attention_mask=mask).last_hidden_state           # [n, T, d]
                nll = F.cross_entropy(head(hidden[rows, cols]).float(), gold, reduction="none")
                if objective == "rewrite":       # the reference: mean over every target token of the batch
                    loss = nll.mean()
                else:
                    per_case = torch.zeros(len(cases), device=lm.device).index_add(0, rows, nll) / n_tgt
                    loss = objective_loss(per_case, objective)
                losses.append(round(loss.item(), 4))
                if objective != "erase" and loss.item() < hp.early_stop_loss:
                    break
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        finally:
            for p in params:
                p.requires_grad_(False)
                p.grad = None
        return {"loss": losses, "steps": len(losses), "adapter_delta_fro": self.delta_norm(),
                "trainable_params": sum(p.numel() for p in params)}

    def delta_norm(self) -> float:
        """sqrt(sum over adapted modules of ||(alpha / r) B A||_F^2): the size of the edit in weight space."""
        weights = self.adapter_weights()
        scale = self.hparams.lora_alpha / self.hparams.rank
        total = 0.0
        for n, a in weights.items():
            if ".lora_A." in n:
                b = weights[n.replace(".lora_A.", ".lora_B.")]
                total += float((scale * b.float() @ a.float()).norm() ** 2)
        return total ** 0.5
