"""Causal tracing (Meng et al., 2022, ROME section 2) and the localization-vs-editing regression of Hase et al.
(2023, "Does Localization Inform Editing?").

Causal tracing of a fact (prompt, subject, answer token o):

    clean run       p_clean      = P(o | prompt)
    corrupted run   p_corrupted  = P(o | prompt, subject token embeddings + eps),  eps ~ N(0, (k * sigma)^2)
                    sigma = standard deviation of the model's input-embedding matrix, k = ``noise`` (ROME: 3)
    restored run    p_restored(kind, l) = P(o | corrupted, with the clean output of ``kind`` restored at the
                    subject's last token for the layers of a window centred on l)
    tracing effect  effect(kind, l) = p_restored(kind, l) - p_corrupted      (ROME's indirect effect)

kind: "hidden" (the residual stream, a block's output; window 1), "mlp" (the MLP output projection) or "attn" (the
attention output projection); ROME restores windows of 10 MLP / attention layers. Every probability is a mean over
``samples`` noise draws (ROME: 10), and all layers of one kind run in one batched forward pass:

    row 0 clean | S rows corrupted | S rows per restored layer window       (the same S noise draws in every group)

The regression: for every (fact, layer) the tracing effect at that layer x and the edit success y of an edit at that
layer; R^2 of ordinary least squares of y on [1, x] (``r2_tracing``), on a one-hot encoding of the layer
(``r2_layer``) and on both (``r2_both``). Hase et al. find r2_layer >> r2_tracing: where tracing localizes a fact
says little about where editing it works.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .editors.common import as_btd, restore_shape, token_grid
from .tokens import encode_target
from .models.loading import LoadedModel

KINDS = ("hidden", "mlp", "attn")


def window_layers(center: int, window: int, n_layers: int) -> list[int]:
    """The layers of a window of ``window`` layers centred on ``center``, clipped at the model's ends (ROME's
    ``range(max(0, l - w // 2), min(L, l - (-w // 2)))``; Hase et al. use the same for editing windows)."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    return list(range(max(0, center - window // 2), min(n_layers, center - (-window // 2))))


def parse_layers(spec: str, n_layers: int) -> list[int]:
    """Layers from ``every:K`` (0, K, 2K, ...), ``all``, or a comma list (negative indices count from the end)."""
    spec = str(spec).strip()
    if spec == "all":
        return list(range(n_layers))
    try:
        if spec.startswith("every:"):
            step = int(spec.split(":", 1)[1])
            if step < 1:
                raise ValueError
            return list(range(0, n_layers, step))
        layers = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"layers {spec!r}: use every:K (K >= 1), all, or a comma list such as 0,5,10") from None
    bad = [x for x in layers if not -n_layers <= x < n_layers]
    if bad or not layers:
        raise ValueError(f"layers {spec!r}: layer {bad[0] if bad else '(none)'} is not in this {n_layers}-layer model; "
                         f"use indices 0..{n_layers - 1}")
    return sorted({x % n_layers for x in layers})


def embedding_std(lm: LoadedModel) -> float:
    """Standard deviation of all entries of the input-embedding matrix (the unit of the tracing noise)."""
    return float(lm.model.get_input_embeddings().weight.detach().float().std())


def subject_token_range(tok, prompt: str, subject: str) -> tuple[int, int]:
    """[first, last + 1) token indices of ``subject``'s first occurrence in ``prompt`` (character offsets of a fast
    tokenizer; a space before the subject merged into its first token counts as the subject's)."""
    start = prompt.find(subject)
    if start < 0:
        raise ValueError(f"subject {subject!r} does not occur in prompt {prompt!r}")
    end = start + len(subject)
    offsets = tok(prompt, return_offsets_mapping=True)["offset_mapping"]
    idx = [i for i, (a, b) in enumerate(offsets) if b > a and b > start and a < end]
    if not idx:
        raise ValueError(f"subject {subject!r} has no tokens in prompt {prompt!r}")
    return idx[0], idx[-1] + 1


@dataclass
class TraceResult:
    """Tracing of one fact: probabilities of the answer's first token and the effect per kind per layer."""

    prompt: str
    subject: str
    answer: str
    answer_token: str
    subject_range: tuple[int, int]
    p_clean: float
    p_corrupted: float
    effects: dict[str, list[float]] = field(default_factory=dict)   # kind -> [n_layers] p_restored - p_corrupted
    window: dict[str, int] = field(default_factory=dict)

    def peak_layer(self, kind: str) -> int:
        return int(np.argmax(self.effects[kind]))

    def metrics(self) -> dict:
        out = {"p_clean": self.p_clean, "p_corrupted": self.p_corrupted,
               "corruption_drop": self.p_clean - self.p_corrupted, "tracing_effect": dict(self.effects)}
        for kind, eff in self.effects.items():
            out[f"peak_layer_{kind}"] = self.peak_layer(kind)
            out[f"max_effect_{kind}"] = float(max(eff))
        return out


def _out(x):
    return x[0] if isinstance(x, tuple) else x


def _with(output, tensor):
    return (tensor,) + tuple(output[1:]) if isinstance(output, tuple) else tensor


@contextlib.contextmanager
def noised_embeddings(lm: LoadedModel, rows: torch.Tensor | slice, span: tuple[int, int], noise: torch.Tensor
                      ) -> Iterator[None]:
    """Add ``noise`` [len(rows), e - b, d] (or [e - b, d], broadcast) to the input embeddings at token positions
    [b, e) of ``rows`` on every forward pass inside the block."""
    b, e = span

    def hook(_m, _inputs, output):
        out = _out(output).clone()
        out[rows, b:e] += noise.to(out.dtype)
        return _with(output, out)

    handle = lm.model.get_input_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class CausalTracer:
    """Causal tracing with fixed settings; ``trace`` one fact at a time. Holds no state between facts.

    noise: multiple of the embedding standard deviation (ROME: 3); samples: noise draws (ROME: 10); window:
    layers restored together for "mlp" and "attn" (ROME: 10; "hidden" always restores one layer); seed: the noise
    generator's seed (the same draws for every fact position, so effects are comparable across layers)."""

    def __init__(self, lm: LoadedModel, noise: float = 3.0, samples: int = 10, window: int = 10, seed: int = 1,
                 max_rows: int = 512):
        if samples < 1:
            raise ValueError(f"tracing needs at least one noise sample, got samples={samples}")
        self.lm = lm
        self.noise = float(noise)
        self.samples = int(samples)
        self.window = int(window)
        self.seed = int(seed)
        self.max_rows = int(max_rows)
        self.sigma = embedding_std(lm)

    def module_name(self, kind: str, layer: int) -> str:
        a = self.lm.adapter
        if kind == "hidden":
            return a.layer_name(layer)
        if kind == "mlp":
            return a.mlp_name(layer)
        if kind == "attn":
            return a.attn_name(layer)
        raise ValueError(f"unknown tracing kind {kind!r}; use one of {', '.join(KINDS)}")

    def last_logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Next-token logits at the last position only, [n, V] float32 (never [n, T, V])."""
        hidden = self.lm.model.base_model(input_ids=ids).last_hidden_state[:, -1]
        return self.lm.model.get_output_embeddings()(hidden).float()

    def noise_draws(self, n_tokens: int) -> torch.Tensor:
        """[samples, n_tokens, d] Gaussian noise of std noise * sigma from a private generator."""
        d = self.lm.model.get_input_embeddings().weight.shape[1]
        gen = torch.Generator().manual_seed(self.seed)
        return self.noise * self.sigma * torch.randn(self.samples, n_tokens, d, generator=gen)

    @torch.no_grad()
    def restored_probs(self, ids: torch.Tensor, span: tuple[int, int], answer_id: int, kind: str,
                       windows: Sequence[Sequence[int]], token: int) -> tuple[float, float, list[float]]:
        """(p_clean, p_corrupted, [p_restored per window]) for one prompt ``ids`` [T]: each window is a list of
        layers whose ``kind`` output is restored to its clean value at position ``token``."""
        dev = self.lm.device
        S = self.samples
        noise = self.noise_draws(span[1] - span[0]).to(dev)              # [S, e - b, d]
        groups = [[]] + [list(w) for w in windows]                       # group 0: corrupted, nothing restored
        per_chunk = max(1, (self.max_rows - 1) // S)
        probs: list[float] = []
        p_clean = None
        for c in range(0, len(groups), per_chunk):
            chunk = groups[c:c + per_chunk]
            n_rows = 1 + S * len(chunk)
            batch = ids[None].expand(n_rows, -1).to(dev)
            by_layer: dict[int, list[int]] = {}
            for g, layers in enumerate(chunk):
                for layer in layers:
                    by_layer.setdefault(layer, []).extend(range(1 + g * S, 1 + (g + 1) * S))
            handles = []

            def restore(rows):
                rows_t = torch.tensor(rows, device=dev)

                def hook(_m, _inputs, output):
                    raw = _out(output)                  # [n_rows, T, d], or [n_rows * T, d] (OPT's MLP)
                    out = as_btd(raw, *token_grid(batch)).clone()               # [n_rows, T, d]
                    out[rows_t, token] = out[0, token]                   # row 0 is the clean run
                    return _with(output, restore_shape(out, raw))
                return hook
            try:
                for layer, rows in by_layer.items():
                    module = self.lm.model.get_submodule(self.module_name(kind, layer))
                    handles.append(module.register_forward_hook(restore(rows)))
                with noised_embeddings(self.lm, slice(1, None), span, noise.repeat(len(chunk), 1, 1)):
                    logits = self.last_logits(batch)                                  # [n_rows, V]
            finally:
                for h in handles:
                    h.remove()
            p = torch.softmax(logits, dim=-1)[:, answer_id]                             # [n_rows]
            p_clean = float(p[0]) if p_clean is None else p_clean
            probs += [float(p[1 + g * S:1 + (g + 1) * S].mean()) for g in range(len(chunk))]
        return p_clean, probs[0], probs[1:]

    def trace(self, prompt: str, subject: str, answer: str | None = None, kinds: Sequence[str] = KINDS,
              token: int | None = None) -> TraceResult:
        """Trace one fact. ``answer``: the expected answer (its first token is traced); None traces the model's
        own top prediction. ``token``: where states are restored (default: the subject's last token)."""
        tok = self.lm.tokenizer
        ids = torch.tensor(tok(prompt).input_ids)
        span = subject_token_range(tok, prompt, subject)
        if answer is None:
            with torch.no_grad():
                answer_id = int(self.last_logits(ids[None].to(self.lm.device))[0].argmax())
            answer = tok.decode([answer_id]).strip()
        else:
            answer_id = encode_target(tok, answer)[0]
        token = span[1] - 1 if token is None else token
        n = self.lm.n_layers
        result = TraceResult(prompt, subject, answer, tok.decode([answer_id]), span, 0.0, 0.0)
        for kind in kinds:
            w = 1 if kind == "hidden" else self.window
            p_clean, p_corr, restored = self.restored_probs(
                ids, span, answer_id, kind, [window_layers(layer, w, n) for layer in range(n)], token)
            result.p_clean, result.p_corrupted = p_clean, p_corr
            result.effects[kind] = [p - p_corr for p in restored]
            result.window[kind] = w
        return result

    @torch.no_grad()
    def corrupted_distribution(self, prompt: str, subject: str) -> torch.Tensor:
        """P(next token | prompt with the subject noised), averaged over the noise draws: [V]."""
        tok = self.lm.tokenizer
        ids = torch.tensor(tok(prompt).input_ids)
        span = subject_token_range(tok, prompt, subject)
        noise = self.noise_draws(span[1] - span[0]).to(self.lm.device)
        batch = ids[None].expand(self.samples, -1).to(self.lm.device)
        with noised_embeddings(self.lm, slice(None), span, noise):
            logits = self.last_logits(batch)
        return torch.softmax(logits, dim=-1).mean(0)


# --- the regression ---------------------------------------------------------------------------------------
def r_squared(y: np.ndarray, X: np.ndarray) -> float:
    """R^2 of the least-squares fit of y [n] on the columns of X [n, k] (X holds its own intercept/one-hot)."""
    y = np.asarray(y, dtype=float)
    X = np.asarray(X, dtype=float)
    if y.size == 0:
        return float("nan")          # no points: nothing to explain (and no NumPy warning)
    ss_tot = float(((y - y.mean()) ** 2).sum())
    if ss_tot == 0.0:
        return float("nan")          # y constant: nothing to explain
    beta, *_ = np.linalg.lstsq(X, y, rcond=None)
    ss_res = float(((y - X @ beta) ** 2).sum())
    return 1.0 - ss_res / ss_tot


def localization_r2(layers: Sequence[int], effects: Sequence[float], success: Sequence[float]
                    ) -> dict[str, float | None]:
    """Hase et al.'s comparison over (fact, layer) points: how much of the variance of edit success the tracing
    effect at the edited layer explains (``r2_tracing``: y ~ 1 + effect), against the layer alone (``r2_layer``:
    y ~ one-hot(layer)) and both (``r2_both``). Points whose effect or success is undefined (None, NaN) are left
    out; an R^2 with nothing to explain (no points, or the same success everywhere) is None, not NaN."""
    if not len(layers) == len(effects) == len(success):
        raise ValueError(f"layers, effects and success differ in length: {len(layers)}, {len(effects)}, "
                         f"{len(success)}")
    keep = [i for i in range(len(success)) if all(v is not None and math.isfinite(float(v))
                                                  for v in (effects[i], success[i]))]
    layers = np.asarray([layers[i] for i in keep], dtype=int)
    x = np.asarray([effects[i] for i in keep], dtype=float)
    y = np.asarray([success[i] for i in keep], dtype=float)
    one_hot = (layers[:, None] == np.unique(layers)[None, :]).astype(float)     # [n, n_distinct_layers]

    def defined(r2: float) -> float | None:
        return None if math.isnan(r2) else r2
    return {"r2_tracing": defined(r_squared(y, np.column_stack([np.ones_like(x), x]))),
            "r2_layer": defined(r_squared(y, one_hot)),
            "r2_both": defined(r_squared(y, np.column_stack([one_hot, x]))),
            "n_points": len(y)}
