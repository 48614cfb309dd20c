"""Second-moment statistics C = E[k k^T] of a layer's keys (the MLP output projection's input), with a disk cache.

ROME and MEMIT whiten their updates with C, estimated on general text (the references: 100,000 Wikipedia articles;
here WikiText-2 from the data dir, a ``hf:`` dataset, or without either text sampled from the model itself,
``model-samples``: the built-in passages hold only ~7k tokens, too few for d_in in the thousands). How many tokens:
``n_tokens``, by default 100,000 of a text corpus, and ``20 x d_in`` of model samples (30,720 for SmolLM2-135M's
d_in of 1536), the least the estimate is kept to; sampling costs a whole forward pass per token, so no more than
that is drawn. Sampled text is not read twice: the keys of the layers asked for are summed by forward hooks while
the model samples it; other layers later read the cached token ids.

``provenance`` says which corpus and how many tokens were used; a warning is issued when fewer tokens were used
than asked for. Computing C is the slowest step of a first run, so results are cached on disk, keyed by model
fingerprint, module, corpus, the corpus's content (SHA-256 of its texts, or the sampling settings of model samples),
token count and dtype, and loaded with ``weights_only=True``. Each file carries that key and a SHA-256 of its
matrix; a damaged, truncated or foreign file is recomputed with a warning. Long steps report through a
``harness.progress.Progress``.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Sequence

import torch

from .data.corpus import MODEL_SAMPLES, model_samples, model_samples_key
from .models.loading import CacheWarning, LoadedModel
from .models.snapshot import tensors_digest
from .progress import Progress
from .tokens import pad_batch

TEXT_CORPUS_TOKENS = 100_000     # default token count of a text corpus (the references' order of magnitude)
SAMPLES_PER_DIM = 20             # default token count of model samples: 20 x d_in


class _Stop(Exception):
    """Raised from a hook once the deepest needed layer has run: the rest of the forward pass is skipped."""


class LayerStats:
    """Owner of second-moment matrices for one model. Hold one per loaded model.

    ``texts`` is a callable returning the corpus (so it is read only when a statistic is missing); with
    ``corpus_name == "model-samples"`` the text is sampled from the model instead (``model_samples``, cached
    under ``cache_dir``) and ``texts`` is not called."""

    def __init__(self, lm: LoadedModel, texts: Callable[[], Sequence[str]], corpus_name: str,
                 n_tokens: int | None = None, cache_dir: Path | None = None, seq_len: int = 256, batch_size: int = 16,
                 progress: Progress | bool = True):
        self.lm = lm
        self._texts = texts
        self.corpus_name = corpus_name
        self.n_tokens = int(n_tokens) if n_tokens is not None else default_tokens(lm, corpus_name)
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.progress = progress if isinstance(progress, Progress) else Progress(enabled=bool(progress))
        self._corpus_digest: str | None = None
        self._read_texts: Sequence[str] | None = None
        self._mem: dict[int, torch.Tensor] = {}
        self._tokens: dict[int, int] = {}          # layer -> tokens its C was estimated from
        self.last_compute_seconds: float | None = None

    @property
    def provenance(self) -> dict:
        """What the statistics in memory were estimated from: {"corpus", "tokens_requested", "tokens_used"}
        (``tokens_used``: the fewest over the layers loaded so far; None before any)."""
        return {"corpus": self.corpus_name, "tokens_requested": self.n_tokens,
                "tokens_used": min(self._tokens.values()) if self._tokens else None}

    def _note_tokens(self, layer: int, count: int) -> None:
        self._tokens[layer] = int(count)
        if 0 < count < self.n_tokens:
            warnings.warn(f"key statistics of layer {layer}: {count} tokens of corpus {self.corpus_name!r} used, "
                          f"{self.n_tokens} asked for (the corpus is too short; C is poorly estimated for d_in "
                          f"in the thousands: pass --stats-corpus with more text)", stacklevel=3)

    def path(self, layer: int) -> Path | None:
        if self.cache_dir is None:
            return None
        ident = self.lm.identity
        corpus = hashlib.sha1(f"{self.corpus_name}:{self.corpus_digest()}".encode()).hexdigest()[:8]
        name = f"{self.lm.adapter.mlp_name(layer)}__{corpus}__{self.n_tokens}__{ident['dtype']}.pt"
        return self.cache_dir / "stats" / ident["fingerprint"] / name

    # --- the on-disk cache: each file carries its key and a digest of its matrix --------------------------------
    def corpus_digest(self) -> str:
        """What the corpus is, by content: SHA-256 of its texts (a file edited on disk is another corpus), or of
        the sampling settings for model samples (the samples follow from them and the model)."""
        if self._corpus_digest is None:
            if self.corpus_name == MODEL_SAMPLES:
                what = model_samples_key(self.lm, self.n_tokens)
            else:
                what = list(self._corpus_texts())
            self._corpus_digest = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()
        return self._corpus_digest

    def cache_key(self, layer: int) -> dict:
        """What a cached matrix was computed from; a file is used only when its key is exactly this."""
        ident = self.lm.identity
        return {"model": ident["fingerprint"], "layer": int(layer), "module": self.lm.adapter.mlp_name(layer),
                "corpus": self.corpus_name, "corpus_sha256": self.corpus_digest(), "n_tokens": self.n_tokens,
                "dtype": ident["dtype"]}

    def _read_cache(self, layer: int) -> tuple[torch.Tensor, int] | None:
        """The cached (C, token count) of ``layer`` when its file is whole and of this key; None (rebuilt, with a one-line
        CacheWarning for a damaged or foreign file) otherwise."""
        p = self.path(layer)
        if p is None or not p.exists():
            return None
        try:
            with warnings.catch_warnings():    # torch's own remarks on a garbled pickle: the one line below says it
                warnings.simplefilter("ignore")
                saved = torch.load(p, weights_only=True, map_location="cpu")
            mom2, key, digest = saved["mom2"], saved.get("key"), saved.get("sha256")
            actual = tensors_digest({"mom2": mom2})
        except Exception as e:  # truncated zip, bad pickle, not a dict of a tensor: the file is damaged
            problem = f"unreadable ({type(e).__name__}: {' '.join(str(e).split())[:100]})"
        else:
            problem = ("of an older harness version (no key and digest)" if key is None or digest is None
                       else "of another model, layer, corpus or token count" if key != self.cache_key(layer)
                       else "damaged (its matrix does not match its SHA-256)" if actual != digest
                       else None)
            if problem is None:
                return mom2, int(saved.get("count", 0))
        warnings.warn(f"statistics cache {p} is {problem}; recomputing it", CacheWarning, stacklevel=4)
        return None

    def _write_cache(self, layer: int, mom2: torch.Tensor, count: int) -> None:
        p = self.path(layer)
        if p is None:
            return
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f"{p.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")  # xdist workers share the dir
        try:
            torch.save({"mom2": mom2, "count": count, "corpus": self.corpus_name, "key": self.cache_key(layer),
                        "sha256": tensors_digest({"mom2": mom2})}, tmp)
            tmp.replace(p)
        finally:
            tmp.unlink(missing_ok=True)

    def second_moment(self, layer: int) -> torch.Tensor:
        """C for ``layer``: [d_in, d_in], float32, on the layer's device."""
        return self.second_moments([layer])[layer]

    def second_moments(self, layers: Sequence[int]) -> dict[int, torch.Tensor]:
        """C for several layers; missing ones are computed together in one pass over the corpus."""
        missing = []
        for layer in layers:
            if layer in self._mem:
                continue
            cached = self._read_cache(layer)
            if cached is not None:
                self._mem[layer] = cached[0]
                self._note_tokens(layer, cached[1])
            else:
                missing.append(layer)
        if missing:
            t0 = time.perf_counter()
            computed = self._compute(missing)
            self.last_compute_seconds = time.perf_counter() - t0
            for layer, (mom2, count) in computed.items():
                self._mem[layer] = mom2
                self._write_cache(layer, mom2, count)
                self._note_tokens(layer, count)
        dev = self.lm.adapter.mlp_weight(self.lm.model, layers[0]).device
        return {layer: self._mem[layer].to(dev) for layer in layers}

    def _corpus_texts(self) -> Sequence[str]:
        """The text corpus, read once."""
        if self._read_texts is None:
            self._read_texts = list(self._texts())
        return self._read_texts

    def corpus_texts(self) -> Sequence[str]:
        """The texts C is estimated from (sampled from the model for ``model-samples``)."""
        if self.corpus_name == MODEL_SAMPLES:
            return model_samples(self.lm, self.n_tokens, self.cache_dir, progress=self.progress).texts
        return self._corpus_texts()

    def _chunks(self) -> list[list[int]]:
        """Token windows of at most ``seq_len`` from the text corpus, up to ``n_tokens`` in all."""
        tok = self.lm.tokenizer
        out, total = [], 0
        for text in self._corpus_texts():
            ids = tok(text).input_ids
            for s in range(0, len(ids), self.seq_len):
                piece = ids[s:s + self.seq_len]
                if len(piece) < 2:
                    continue
                piece = piece[: self.n_tokens - total]
                out.append(piece)
                total += len(piece)
                if total >= self.n_tokens:
                    return out
        return out

    @contextmanager
    def _key_sums(self, layers: Sequence[int], sums: dict, counts: dict, state: dict, stop: bool):
        """Forward hooks on the layers' MLP output projections adding k k^T of every key they see to ``sums``
        (float64): the keys at ``state["mask"]`` (None: every position). ``stop``: the forward pass ends after the
        deepest layer (the rest of the model is not needed)."""
        lm, deepest = self.lm, max(layers)

        def make_hook(layer):
            def hook(_m, inputs, _out):
                k = inputs[0]                                                          # [b, T, d_in]
                mask = state.get("mask")
                if k.dim() == 2 and mask is not None:       # OPT's blocks run the MLP on [b * T, d_in]
                    k = k.view(*mask.shape, k.shape[-1])
                keys = (k[mask.bool()] if mask is not None else k.reshape(-1, k.shape[-1])).double()  # [n, d_in]
                sums[layer] = sums.get(layer, 0) + keys.T @ keys                       # [d_in, d_in]
                counts[layer] = counts.get(layer, 0) + keys.shape[0]
                if stop and layer == deepest:
                    raise _Stop
            return hook

        handles = [lm.adapter.module(lm.model, lm.adapter.mlp_name(layer)).register_forward_hook(make_hook(layer))
                   for layer in layers]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @torch.no_grad()
    def _forward(self, layers: Sequence[int], chunks: list[list[int]], what: str) -> tuple[dict, dict]:
        """Key sums of ``layers`` over token windows ``chunks``, in batches, each pass stopped after the deepest."""
        lm = self.lm
        chunks = sorted(chunks, key=len, reverse=True)          # similar lengths together: little padding
        sums: dict[int, torch.Tensor] = {}
        counts: dict[int, int] = {}
        state: dict = {}
        pad = lm.tokenizer.pad_token_id
        desc = f"key statistics of layer{'s' if len(layers) > 1 else ''} {','.join(map(str, layers))} ({what})"
        with self.progress.step(desc, total=sum(map(len, chunks)), unit="tok") as bar, \
                self._key_sums(layers, sums, counts, state, stop=True):
            for s in range(0, len(chunks), self.batch_size):
                ids, mask = pad_batch(chunks[s:s + self.batch_size], pad, device=lm.device)
                state["mask"] = mask
                try:
                    lm.model(input_ids=ids, attention_mask=mask)
                except _Stop:
                    pass
                bar.update(int(mask.sum()))
        return sums, counts

    @torch.no_grad()
    def _compute(self, layers: Sequence[int]) -> dict[int, tuple[torch.Tensor, int]]:
        layers = sorted(set(layers))
        if self.corpus_name == MODEL_SAMPLES:
            # sampled now: the keys are summed while the model samples; read from the cache: one pass over its ids
            sums: dict[int, torch.Tensor] = {}
            counts: dict[int, int] = {}
            hooks = self._key_sums(layers, sums, counts, {}, stop=False)
            samples = model_samples(self.lm, self.n_tokens, self.cache_dir, progress=self.progress, sampling=hooks)
            if not counts:
                sums, counts = self._forward(layers, samples.ids, "model samples, cached")
        else:
            chunks = self._chunks()
            if not chunks:
                raise ValueError(f"corpus {self.corpus_name!r} is empty: no text to estimate key statistics from")
            sums, counts = self._forward(layers, chunks, self.corpus_name)
        return {layer: ((sums[layer] / counts[layer]).float().cpu(), counts[layer]) for layer in layers}


def default_tokens(lm: LoadedModel, corpus_name: str) -> int:
    """Tokens of key statistics when none are asked for: ``SAMPLES_PER_DIM x d_in`` of model samples (each costs a
    sampled token), else ``TEXT_CORPUS_TOKENS``."""
    if corpus_name != MODEL_SAMPLES:
        return TEXT_CORPUS_TOKENS
    d_in = lm.adapter.weight_as_linear(lm.model, 0).shape[1]
    return SAMPLES_PER_DIM * int(d_in)
