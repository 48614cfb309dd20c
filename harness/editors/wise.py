"""WISE: Rethinking the Knowledge Memory for Lifelong Model Editing of Large Language Models (Wang et al.,
NeurIPS 2024).

WISE keeps the model's own MLP output projection W [d_out, d_in] of one layer as the *main memory*, never written,
and adds *side memories* W' (copies of W) that the edits are written into. A router decides, per input, which memory
answers:

    a(h)     the activation function of the model (silu for Llama, gelu for GPT-2), applied to layer outputs
    D(x; W') = mean_t || a(W x_t) - a(W' x_t) ||_2          activation distance of a sequence (its max over t when
                                                             the sequence is longer than 100 tokens)
    route(x) = W'   if D(x; W') >= act_ratio * min_{edits e in W'} D(x_e; W')
               W    otherwise                                 (the main memory, bit for bit the unedited layer)

Editing one fact (prompt p, target y) trains the current side memory W' only, on a random subset of its entries
(a gradient mask of density ``mask_ratio``, drawn once per shard: "knowledge sharding"):

    rows x_j = c_j(p) + " " + y for the context templates c_j,  and one unrelated row x_o (from the pool)
    L_edit   = mean_j NLL(y | c_j(p); W')                                      every row through W'
    L_act    = mean+ (D(x_o) - D(x_j) + gamma)  +  mean+ (D(x_o) - alpha)  +  mean+ (beta - D(x_j))
                                    (mean+ : the mean of the positive terms, 0 when none; alpha/beta/gamma are
                                     the reference's act_margin)
    W' <- W' - lr * mask * grad(L_edit + L_act)  (SGD, weight decay 1e-5),  then W' clipped to W +- norm_constraint
    stop when the loss changed by <= 1e-4 and is <= 0.02, else after n_iter steps; D(x_j) at the last forward pass
    updates the shard's threshold statistic min_e D(x_e; W').

Every ``save_freq`` edits the current side memory is saved and a fresh copy of W (with a fresh mask) starts the
next shard; every ``merge_freq`` edits the saved shards are merged by TIES (trim to ``densities`` by magnitude,
elect the sign of the summed task vectors, average the agreeing entries). ``retrieve: true`` (WISE-Retrieve, the
reference's default setting) merges the last ``merge_freq / save_freq`` shards into one retrievable memory with the
smallest of their thresholds, and the router picks, among the memories over their threshold, the one with the
largest distance; ``retrieve: false`` (WISE-Merge) merges all saved shards into one merged side memory (0.6 weight
to the earlier merge, 0.4 to the new shards) and routes between the main, the merged and the current memory.

Reference: zjunlp/EasyEdit ``easyeditor/models/wise/WISE.py`` (router, losses, sharding, merging), ``utils.py``
(rows, context templates) and ``merge/gta.py`` (TIES); settings from ``hparams/WISE/llama-7b.yaml``. Divergences:

- the router decides per sequence of a batch over its real tokens (the reference sees one sequence and averages
  over padding too), reading the attention mask from a pre-hook on the model body;
- side memories live in a forward hook on the module (the reference swaps the module), so the model's module tree
  and parameters never change and removing the hook restores it exactly;
- WISE-Merge merges at the edit that completes a merge period (the reference also merges pending shards at the first
  inference call after ``save_freq`` edits);
- the context templates are sampled (top-k, seeded) with the reference's seed words, not greedy-decoded;
  gradient masks come from a generator seeded with ``seed`` and the shard number (the reference: numpy's global
  RNG); the unrelated rows are the pool's locality prompts with their answers, as the reference's zsRE runs use
  NQ questions from the training split; replay (the reference's ``replay``, off by default) is not implemented.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from ..data.case import EditCase
from ..data.pool import load_pool
from ..models.loading import LoadedModel
from ..tokens import encode_target, pad_batch
from .base import Capabilities, Edit, Editor, register_editor
from .common import ContextTemplates, as_btd, objective_loss, restore_shape, token_grid

LONG_SEQUENCE = 100          # longer sequences are routed on their largest token distance (reference: infer mode)
SLICEABLE = ("llama", "mistral", "qwen2", "qwen3")   # bodies that walk a ``layers`` list from ``inputs_embeds``


@dataclass
class WiseHparams:
    layer: int = 27
    edit_lr: float = field(default=1.0, metadata={"gt": 0})
    n_iter: int = field(default=70, metadata={"min": 1})
    mask_ratio: float = field(default=0.2, metadata={"gt": 0, "max": 1})
    alpha: float = field(default=5.0, metadata={"min": 0})  # act_margin[0]: unrelated inputs stay below this distance
    beta: float = field(default=20.0, metadata={"min": 0})  # act_margin[1]: edited inputs rise above this distance
    gamma: float = field(default=10.0, metadata={"min": 0})  # act_margin[2]: and above the unrelated ones by this much
    act_ratio: float = field(default=0.88, metadata={"gt": 0})
    norm_constraint: float = field(default=1.0, metadata={"gt": 0})  # |W' - W| <= this, entry-wise
    weight_decay: float = field(default=1e-5, metadata={"min": 0})
    save_freq: int = field(default=500, metadata={"min": 1})  # edits per shard
    merge_freq: int = field(default=1000, metadata={"min": 1})  # edits per merge (a multiple of save_freq)
    retrieve: bool = True              # WISE-Retrieve (true) or WISE-Merge (false)
    densities: float = field(default=0.53, metadata={"gt": 0, "max": 1})  # TIES: fraction of each task vector kept
    pool: str = "builtin"              # where the unrelated rows come from (harness.data.pool)
    context_template_length_params: list = field(default_factory=lambda: [[5, 5], [10, 5]])
    context_seed_prompts: list = field(default_factory=lambda: ["I", "You", "Because", "Yes", "Q: "])
    template_seed: int = 0
    seed: int = 0


@dataclass
class SideMemory:
    weight: torch.Tensor                      # W' [d_out, d_in] (linear layout)
    min_act: float = 1e9                      # min over its edits of D(x_e; W') (the router's threshold / act_ratio)
    n_edits: int = 0

    def state(self) -> dict[str, Any]:
        return {"weight": self.weight.detach().cpu(), "min_act": self.min_act, "n_edits": self.n_edits}


def ties_merge(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float],
               density: float) -> torch.Tensor:
    """TIES merging (Yadav et al., 2023) as the reference's GTA('magnitude', 'sum', normalize=True): task vectors
    tau_i = W_i - base trimmed to their largest-magnitude ``density`` fraction, the sign elected by the sign of
    sum_i w_i tau_i, and base + sum_i w_i tau_i [agrees] / sum_i w_i [agrees]."""
    taus = []
    for t in tensors:
        tau = (t - base).float()
        if density < 1:
            k = max(1, int(density * tau.numel()))
            keep = torch.zeros(tau.numel(), dtype=torch.bool, device=tau.device)
            keep[tau.abs().flatten().topk(k).indices] = True
            tau = tau * keep.view_as(tau)
        taus.append(tau)
    taus_t = torch.stack(taus)                                                  # [m, d_out, d_in]
    w = torch.tensor(list(weights), dtype=taus_t.dtype, device=taus_t.device).view(-1, 1, 1)
    weighted = taus_t * w
    elected = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)                      # the majority sign
    agree = (weighted.sign() == elected).to(taus_t.dtype)
    divisor = (w * agree).sum(0)
    divisor[divisor == 0] = 1
    return (base.float() + (weighted * agree).sum(0) / divisor).to(base.dtype)


class Router:
    """The forward hooks: a pre-hook on the model and on its body keeps the call's attention mask and token grid
    (b, T); the hook on the layer routes each sequence to the main memory (the layer's own output, untouched) or to
    a side memory. The model's own pre-hook is needed where its forward bypasses the body's (OPTForCausalLM calls
    ``model.decoder`` directly); where both fire they keep the same call's values."""

    def __init__(self, wise: "WISE", lm: LoadedModel):
        self.wise, self.mask = wise, None
        self.grid: tuple[int, int] | None = None   # (b, T) of the current call's input_ids / inputs_embeds
        self.act = ACT2FN[getattr(lm.model.config, "hidden_act", None)
                          or getattr(lm.model.config, "activation_function", "gelu_new")]
        self.module = lm.adapter.module(lm.model, lm.adapter.mlp_name(wise.hparams.layer))
        self.bias = getattr(self.module, "bias", None)
        self.training: dict | None = None          # while an edit trains: {"weight": W', "out": (orig, side)}
        bodies = [lm.model] + ([lm.model.base_model] if lm.model.base_model is not lm.model else [])
        self.handles = [b.register_forward_pre_hook(self._keep_mask, with_kwargs=True) for b in bodies]
        self.handles.append(self.module.register_forward_hook(self._route))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def _keep_mask(self, _module, args, kwargs):
        mask = kwargs.get("attention_mask")
        self.mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None    # [B, T_all]
        x = next((kwargs[k] for k in ("input_ids", "inputs_embeds") if kwargs.get(k) is not None),
                 args[0] if args else None)                                  # [B, T] ids or [B, T, d] embeddings
        self.grid = token_grid(x) if isinstance(x, torch.Tensor) and x.dim() >= 2 else None

    def tokens(self, x: torch.Tensor) -> tuple[int, int] | None:
        """(B, T) of the layer's input x: [B, T, d_in] itself, or [B * T, d_in] (OPT's flattened MLP) with the
        call's grid; None when unknown."""
        if x.dim() == 3:
            return int(x.shape[0]), int(x.shape[1])
        if x.dim() == 2 and self.grid is not None and self.grid[0] * self.grid[1] == x.shape[0]:
            return self.grid
        return None

    def valid(self, shape: torch.Size, device) -> torch.Tensor:
        """[B, T] bool: the real tokens of the current call (all of them when no usable mask was seen)."""
        B, T = shape[0], shape[1]
        if self.mask is not None and self.mask.shape[0] == B and self.mask.shape[1] >= T:
            return self.mask[:, -T:].to(device).bool()
        return torch.ones(B, T, dtype=torch.bool, device=device)

    def side(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, weight.to(device=x.device, dtype=x.dtype))
        return out if self.bias is None else out + self.bias

    def distance(self, orig: torch.Tensor, side: torch.Tensor, valid: torch.Tensor, infer: bool) -> torch.Tensor:
        """D per sequence [B]: mean over real tokens of ||a(orig_t) - a(side_t)|| (max when long, at inference)."""
        d = (self.act(orig.float()) - self.act(side.float())).norm(dim=-1)     # [B, T]
        if infer and orig.shape[1] > LONG_SEQUENCE:
            return d.masked_fill(~valid, float("-inf")).max(dim=1).values
        return (d * valid).sum(1) / valid.sum(1).clamp(min=1)

    def _route(self, _module, inputs, output):
        x = inputs[0]                               # [B, T, d_in], or [B * T, d_in] (OPT)
        if self.training is not None:               # editing: every row through W' (in the module's own shape)
            side = self.side(x, self.training["weight"])
            self.training["out"] = (output, side)
            return side
        memories = self.wise.routable()
        grid = self.tokens(x) if memories else None
        if grid is None:
            return output
        x, out3 = as_btd(x, *grid), as_btd(output, *grid)                                     # [B, T, d]
        valid = self.valid(x.shape, x.device)
        sides = [self.side(x, m.weight) for m, _ in memories]                                 # [B, T, d_out]
        dists = torch.stack([self.distance(out3, s, valid, infer=True) for s in sides])     # [M, B]
        thresholds = torch.tensor([thr for _, thr in memories], device=dists.device)[:, None]
        choice = self.wise.choose(dists, thresholds)                                          # [B], -1 = main
        out = out3
        for j, s in enumerate(sides):
            out = torch.where((choice == j)[:, None, None], s, out)
        return restore_shape(out, output)                                                     # the module's shape


class UpperLayers:
    """The model body run from decoder layer ``layer`` up, for training a side memory at that layer: the layers
    below never see W', so their output (the residual stream entering ``layer``) is computed once and each step
    runs only the layers above. Exact for Llama-family bodies, which walk their ``layers`` list in order starting
    from ``inputs_embeds`` (the residual stream); any other body runs whole (``available`` is False)."""

    def __init__(self, lm: LoadedModel, layer: int):
        self.body, self.layer = lm.model.base_model, layer
        self.available = (lm.adapter.family in SLICEABLE and isinstance(getattr(self.body, "layers", None),
                                                                        torch.nn.ModuleList))

    @torch.no_grad()
    def residual(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The residual stream entering ``layer`` [n, T, d] (one forward pass of the lower layers)."""
        seen: dict = {}

        def keep(_module, args, kwargs):
            seen["h"] = args[0] if args else kwargs["hidden_states"]
            raise _Stop

        handle = self.body.layers[self.layer].register_forward_pre_hook(keep, with_kwargs=True)
        try:
            self.body(input_ids=ids, attention_mask=mask, use_cache=False)
        except _Stop:
            pass
        finally:
            handle.remove()
        return seen["h"].detach()

    @contextlib.contextmanager
    def sliced(self):
        full = self.body.layers
        self.body.layers = torch.nn.ModuleList(list(full)[self.layer:])
        try:
            yield
        finally:
            self.body.layers = full


class _Stop(Exception):
    """Ends a forward pass once the residual stream entering the side memory's layer is captured."""


@register_editor
class WISE(Editor):
    name = "wise"
    Hparams = WiseHparams
    capabilities = Capabilities(needs_key_stats=False, changes="hooks", batches=False, values_ahead=False)
    objectives = ("rewrite", "amplify", "erase")    # not "force": the edit keys on the clean prompt

    def __init__(self, hparams: WiseHparams, *, stats=None):
        super().__init__(hparams, stats=stats)
        if hparams.merge_freq % hparams.save_freq:
            raise ValueError(f"wise: merge_freq ({hparams.merge_freq}) must be a multiple of save_freq "
                             f"({hparams.save_freq}); e.g. --hparam wise.merge_freq={2 * hparams.save_freq}")
        self.context_templates = ContextTemplates(hparams)
        self._lm: LoadedModel | None = None
        self._router: Router | None = None
        self._unrelated: list[str] | None = None
        self._clear()

    def _clear(self) -> None:
        self.current: SideMemory | None = None     # the shard being written
        self.memories: list[SideMemory] = []       # saved shards (retrieve) / shards waiting to be merged (merge)
        self.merged: SideMemory | None = None      # WISE-Merge's merged side memory
        self.n_edits = 0
        self.n_shards = 0
        self._mask: torch.Tensor | None = None

    # --- lifecycle ------------------------------------------------------------------------------------------
    def prepare(self, lm: LoadedModel) -> None:
        self._lm = lm
        self.context_templates(lm)
        if self.n_edits:
            self._attach(lm)

    def _attach(self, lm: LoadedModel) -> None:
        self._lm = lm
        if self._router is None:
            self._router = Router(self, lm)

    def _detach(self) -> None:
        if self._router is not None:
            self._router.remove()
            self._router = None

    @property
    def attached(self) -> bool:
        return self._router is not None

    def reset(self) -> None:
        """Remove the side memories and their hooks: the model is the unedited model again."""
        self._detach()
        self._clear()

    def edited_parameters(self, lm: LoadedModel) -> list[str]:
        return []                                  # the main memory is never written

    def _snapshot(self) -> dict[str, Any]:
        copy = lambda m: None if m is None else SideMemory(m.weight.clone(), m.min_act, m.n_edits)  # noqa: E731
        return {"current": copy(self.current), "memories": [copy(m) for m in self.memories],
                "merged": copy(self.merged), "n_edits": self.n_edits, "n_shards": self.n_shards,
                "mask": self._mask}

    def _restore_snapshot(self, snap: dict[str, Any]) -> None:
        self.current, self.memories, self.merged = snap["current"], list(snap["memories"]), snap["merged"]
        self.n_edits, self.n_shards, self._mask = snap["n_edits"], snap["n_shards"], snap["mask"]
        if not self.n_edits:
            self._detach()

    def state(self) -> dict[str, Any]:
        return {"current": self.current.state() if self.current else None,
                "memories": [m.state() for m in self.memories],
                "merged": self.merged.state() if self.merged else None,
                "n_edits": self.n_edits, "n_shards": self.n_shards, "templates": self.context_templates.state()}

    def load_state(self, state: dict[str, Any]) -> None:
        self.reset()
        self.context_templates.load_state(state.get("templates", {}))
        mem = lambda s: None if s is None else SideMemory(s["weight"], float(s["min_act"]), int(s["n_edits"]))  # noqa
        self.current, self.merged = mem(state.get("current")), mem(state.get("merged"))
        self.memories = [mem(s) for s in state.get("memories", [])]
        self.n_edits, self.n_shards = int(state.get("n_edits", 0)), int(state.get("n_shards", 0))
        if self.n_shards:
            self._mask = self.shard_mask(self.current.weight, self.n_shards - 1)
        if self.n_edits and self._lm is not None:
            self._attach(self._lm)

    # --- routing --------------------------------------------------------------------------------------------
    def routable(self) -> list[tuple[SideMemory, float]]:
        """(memory, threshold) in the router's order: current shard, then the saved/merged memories."""
        r = self.hparams.act_ratio
        if self.hparams.retrieve:
            mems = [m for m in [self.current, *self.memories] if m is not None and m.n_edits]
            return [(m, m.min_act * r) for m in mems]
        # WISE-Merge: one threshold, from every edit so far (the reference never resets it in this mode)
        thr = min([m.min_act for m in [self.current, self.merged, *self.memories] if m is not None] or [1e9]) * r
        return [(m, thr) for m in (self.current, self.merged) if m is not None and m.n_edits]

    def choose(self, dists: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
        """Per sequence, the memory that answers: index into ``routable()``, or -1 for the main memory."""
        B = dists.shape[1]
        main = torch.full((B,), -1, dtype=torch.long, device=dists.device)
        if self.hparams.retrieve:          # current shard if over its threshold; a saved one if further still
            choice = torch.where(dists[0] >= thresholds[0], torch.zeros_like(main), main)
            best = dists[0].clone()
            for j in range(1, len(dists)):
                take = (dists[j] > best) & (dists[j] > thresholds[j])
                choice = torch.where(take, torch.full_like(main, j), choice)
                best = torch.where(take, dists[j], best)
            return choice
        if len(dists) == 1:
            return torch.where(dists[0] >= thresholds[0], torch.zeros_like(main), main)
        cur, merged = dists[0], dists[1]   # WISE-Merge: main when both are under, else the further one
        pick = torch.where(merged > cur, torch.ones_like(main), torch.zeros_like(main))
        return torch.where((cur < thresholds[0]) & (merged < thresholds[1]), main, pick)

    # --- the edit -------------------------------------------------------------------------------------------
    def apply(self, lm: LoadedModel, cases: Sequence[EditCase]) -> Edit:
        if len(cases) != 1:
            raise ValueError(f"editor {self.name!r} edits one case at a time; use --batch-size 1")
        if cases[0].objective == "force":
            raise ValueError("WISE routes on the clean prompt's activations; the fact-forcing problem (noised "
                             "subject) does not apply to it")
        snap = self._snapshot()
        self.prepare(lm)
        self._attach(lm)
        t0 = time.perf_counter()
        try:
            info = self.execute(lm, cases)
        except BaseException:
            self._restore_snapshot(snap)
            raise
        return Edit(self.name, [cases[0].case_id], undo=lambda: self._restore_snapshot(self._snapshot_copy(snap)),
                    info=info, seconds=time.perf_counter() - t0)

    @staticmethod
    def _snapshot_copy(snap: dict[str, Any]) -> dict[str, Any]:
        copy = lambda m: None if m is None else SideMemory(m.weight.clone(), m.min_act, m.n_edits)  # noqa: E731
        return {**snap, "current": copy(snap["current"]), "memories": [copy(m) for m in snap["memories"]],
                "merged": copy(snap["merged"])}

    def shard_mask(self, weight: torch.Tensor, shard: int) -> torch.Tensor:
        """The gradient mask of shard ``shard``: Bernoulli(mask_ratio) entries, seeded."""
        gen = torch.Generator().manual_seed(self.hparams.seed * 1000003 + shard)
        return (torch.rand(weight.shape, generator=gen) < self.hparams.mask_ratio).to(weight.device)

    def _new_shard(self, lm: LoadedModel) -> None:
        w0 = lm.adapter.weight_as_linear(lm.model, self.hparams.layer).detach().clone()   # a fresh copy of W
        self.current = SideMemory(w0)
        self._mask = self.shard_mask(w0, self.n_shards)
        self.n_shards += 1

    def unrelated_text(self) -> str:
        """The unrelated row of the next edit: the pool's locality prompts (with answers), in turn."""
        if self._unrelated is None:
            self._unrelated = [f"{r.locality_prompt} {r.locality_answer}" for r in load_pool(self.hparams.pool)]
        return self._unrelated[(self.hparams.seed + self.n_edits) % len(self._unrelated)]

    def execute(self, lm: LoadedModel, cases: Sequence[EditCase]) -> dict[str, Any]:
        (case,) = cases
        if self.current is None:
            self._new_shard(lm)
        ids, mask, spans = self.rows(lm, case)
        losses, in_dist, out_dist = self.train_shard(lm, ids, mask, spans, case)
        self.current.min_act = min(self.current.min_act, in_dist)
        self.current.n_edits += 1
        self.n_edits += 1
        w0 = lm.adapter.weight_as_linear(lm.model, self.hparams.layer)
        info = {"loss": losses, "steps": len(losses), "in_scope_distance": in_dist, "out_scope_distance": out_dist,
                "threshold": self.current.min_act * self.hparams.act_ratio,
                "side_delta_fro": float((self.current.weight - w0).norm())}
        info["merged"] = self._after_edit(lm)
        info["n_memories"] = len(self.memories) + (self.merged is not None) + bool(self.current.n_edits)
        return info

    def rows(self, lm: LoadedModel, case: EditCase) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
        """Right-padded ids/mask [n_templates + 1, T]: each context template around "prompt target", then the
        unrelated row; spans[j] = (start, length) of the target tokens of template row j."""
        tok = lm.tokenizer
        target = encode_target(tok, case.target_new)
        seqs, spans = [], []
        for template in self.context_templates(lm):
            p = tok(template.replace("{}", case.rewrite_prompt)).input_ids
            seqs.append(p + target)
            spans.append((len(p), len(target)))
        seqs.append(tok(self.unrelated_text()).input_ids)
        ids, mask = pad_batch(seqs, tok.pad_token_id, device=lm.device)
        return ids, mask, spans

    @staticmethod
    def _positive_mean(x: torch.Tensor) -> torch.Tensor:
        """The reference's mean+: the mean of the positive entries, 0 when there is none."""
        pos = x[x > 0]
        return pos.mean() if pos.numel() else x.new_zeros(())

    def activation_loss(self, in_d: torch.Tensor, out_d: torch.Tensor) -> torch.Tensor:
        """L_act for in-scope distances [n] and the unrelated row's distance (a scalar)."""
        hp = self.hparams
        return (self._positive_mean(out_d - in_d + hp.gamma) + self._positive_mean((out_d - hp.alpha)[None])
                + self._positive_mean(hp.beta - in_d))

    def train_shard(self, lm: LoadedModel, ids: torch.Tensor, mask: torch.Tensor, spans: list[tuple[int, int]],
                    case: EditCase) -> tuple[list[float], float, float]:
        """SGD on the current side memory W' (masked gradient, clipped to W +- norm_constraint). Returns the losses
        and the in-scope / unrelated distances at the last forward pass."""
        hp, router = self.hparams, self._router
        assert router is not None and self.current is not None and self._mask is not None
        w0 = lm.adapter.weight_as_linear(lm.model, hp.layer).detach()                  # W [d_out, d_in]
        w = self.current.weight.to(lm.device).clone().requires_grad_(True)              # W'
        optimizer = torch.optim.SGD([w], lr=hp.edit_lr, weight_decay=hp.weight_decay)
        head, body = lm.model.get_output_embeddings(), lm.model.base_model
        upper = UpperLayers(lm, hp.layer)
        inputs = ({"inputs_embeds": upper.residual(ids, mask)} if upper.available else {"input_ids": ids})
        n_tpl = len(spans)
        rows = torch.arange(n_tpl, device=lm.device).repeat_interleave(torch.tensor([n for _, n in spans]))
        cols = torch.tensor([s - 1 + j for s, n in spans for j in range(n)], device=lm.device)
        gold = ids[rows, cols + 1]
        router.training = {"weight": w}
        try:
            with upper.sliced() if upper.available else contextlib.nullcontext():
                losses, in_d, out_d = self._sgd(body, head, inputs, mask, w, w0, optimizer, rows, cols, gold,
                                                spans, case)
        finally:
            router.training = None
        self.current.weight = w.detach()
        return [round(x, 4) for x in losses], float(in_d.detach().mean()), float(out_d.detach())

    def _sgd(self, body, head, inputs, mask, w, w0, optimizer, rows, cols, gold, spans, case):
        """The optimisation loop of ``train_shard``: (losses, in-scope distances [n], unrelated distance)."""
        hp, router, n_tpl = self.hparams, self._router, len(spans)
        n_tgt = torch.tensor([n for _, n in spans], device=w.device)
        valid = mask.bool()
        losses: list[float] = []
        for it in range(hp.n_iter):
            hidden = body(**inputs, attention_mask=mask, use_cache=False).last_hidden_state          # [n, T, d]
            nll = F.cross_entropy(head(hidden[rows, cols]).float(), gold, reduction="none")         # [sum t]
            per_row = torch.zeros(n_tpl, device=w.device).index_add(0, rows, nll) / n_tgt          # [n_tpl]
            orig, side = (as_btd(t, *token_grid(mask)) for t in router.training["out"])     # [n, T, d_out]
            dist = router.distance(orig, side, valid, infer=False)                                  # [n]
            in_d, out_d = dist[:n_tpl], dist[n_tpl]
            loss = objective_loss(per_row, case.objective) + self.activation_loss(in_d, out_d)
            stop = len(losses) >= 2 and abs(losses[-1] - losses[-2]) <= 1e-4 and losses[-1] <= 0.02
            if stop or it == hp.n_iter - 1:
                break                           # (the reference's EarlyStopMeter; its final step is skipped)
            losses.append(loss.item())
            optimizer.zero_grad()
            loss.backward()
            w.grad.mul_(self._mask)             # knowledge sharding: this shard's entries only
            optimizer.step()
            with torch.no_grad():
                w.copy_(torch.maximum(torch.minimum(w, w0 + hp.norm_constraint), w0 - hp.norm_constraint))
        losses.append(loss.item())
        return losses, in_d, out_d

    def _after_edit(self, lm: LoadedModel) -> bool:
        """Save the shard every ``save_freq`` edits; merge every ``merge_freq``. True when a merge happened."""
        hp = self.hparams
        if self.n_edits % hp.save_freq:
            return False
        self.memories.append(self.current)
        self._new_shard(lm)
        if self.n_edits % hp.merge_freq:
            return False
        w0 = lm.adapter.weight_as_linear(lm.model, hp.layer).detach()
        if hp.retrieve:          # the last merge_freq/save_freq shards become one retrievable memory
            k = hp.merge_freq // hp.save_freq
            group, self.memories = self.memories[-k:], self.memories[:-k]
            merged = ties_merge(w0, [m.weight for m in group], [1.0 / k] * k, hp.densities)
            self.memories.append(SideMemory(merged, min(m.min_act for m in group), sum(m.n_edits for m in group)))
        else:                    # every waiting shard into the merged memory (0.6 to the earlier merge)
            m, shards = len(self.memories), self.memories
            tensors, weights = [s.weight for s in shards], [1.0 / m] * m
            if self.merged is not None:
                tensors, weights = tensors + [self.merged.weight], [0.4 / m] * m + [0.6]
            n_edits = sum(s.n_edits for s in shards) + (self.merged.n_edits if self.merged else 0)
            min_act = min([s.min_act for s in shards] + ([self.merged.min_act] if self.merged else []))
            self.merged = SideMemory(ties_merge(w0, tensors, weights, hp.densities), min_act, n_edits)
            self.memories = []
        return True
