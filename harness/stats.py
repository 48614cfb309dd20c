"""Second-moment statistics C = E[k k^T] of a layer's keys (the MLP output projection's input), with a disk cache.

ROME and MEMIT whiten their updates with C, estimated on general text (the references: 100,000 Wikipedia articles;
here WikiText-2 from the data dir, or without one text sampled from the model itself, ``model-samples``: the
built-in passages hold only ~7k tokens, too few for d_in in the thousands). ``provenance`` says which corpus and how
many tokens were used; a warning is issued when fewer tokens were used than asked for. Computing it is the slowest
step of a first run, so results are cached on disk, keyed by model fingerprint, module, corpus, token count and
dtype, and loaded with ``weights_only=True``. Each file carries that key and a SHA-256 of its matrix; a damaged,
truncated or foreign file is recomputed with a warning.
"""
from __future__ import annotations

import hashlib
import os
import time
import uuid
import warnings
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from .data.corpus import MODEL_SAMPLES, model_sample_texts
from .models.loading import CacheWarning, LoadedModel
from .models.snapshot import tensors_digest
from .tokens import pad_batch


class _Stop(Exception):
    """Raised from a hook once the deepest needed layer has run: the rest of the forward pass is skipped."""


class LayerStats:
    """Owner of second-moment matrices for one model. Hold one per loaded model.

    ``texts`` is a callable returning the corpus (so it is read only when a statistic is missing); with
    ``corpus_name == "model-samples"`` the text is sampled from the model instead (``model_sample_texts``, cached
    under ``cache_dir``) and ``texts`` is not called."""

    def __init__(self, lm: LoadedModel, texts: Callable[[], Sequence[str]], corpus_name: str, n_tokens: int = 100_000,
                 cache_dir: Path | None = None, seq_len: int = 256, batch_size: int = 16, progress: bool = True):
        self.lm = lm
        self._texts = texts
        self.corpus_name = corpus_name
        self.n_tokens = int(n_tokens)
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.progress = progress
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
        corpus = hashlib.sha1(self.corpus_name.encode()).hexdigest()[:8]
        name = f"{self.lm.adapter.mlp_name(layer)}__{corpus}__{self.n_tokens}__{ident['dtype']}.pt"
        return self.cache_dir / "stats" / ident["fingerprint"] / name

    # --- the on-disk cache: each file carries its key and a digest of its matrix --------------------------------
    def cache_key(self, layer: int) -> dict:
        """What a cached matrix was computed from; a file is used only when its key is exactly this."""
        ident = self.lm.identity
        return {"model": ident["fingerprint"], "layer": int(layer), "module": self.lm.adapter.mlp_name(layer),
                "corpus": self.corpus_name, "n_tokens": self.n_tokens, "dtype": ident["dtype"]}

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

    def corpus_texts(self) -> Sequence[str]:
        """The texts C is estimated from (sampled from the model for ``model-samples``)."""
        if self.corpus_name == MODEL_SAMPLES:
            return model_sample_texts(self.lm, self.n_tokens, self.cache_dir, progress=self.progress)
        return self._texts()

    def _chunks(self) -> list[list[int]]:
        """Token windows of at most ``seq_len`` from the corpus, up to ``n_tokens`` in all."""
        tok = self.lm.tokenizer
        out, total = [], 0
        for text in self.corpus_texts():
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

    @torch.no_grad()
    def _compute(self, layers: Sequence[int]) -> dict[int, tuple[torch.Tensor, int]]:
        lm = self.lm
        chunks = sorted(self._chunks(), key=len, reverse=True)  # similar lengths together: little padding
        if not chunks:
            raise ValueError(f"corpus {self.corpus_name!r} is empty: no text to estimate key statistics from")
        sums: dict[int, torch.Tensor] = {}
        count = 0
        deepest = max(layers)
        current_mask: dict = {}

        def make_hook(layer):
            def hook(_m, inputs, _out):
                k = inputs[0]                                   # [b, T, d_in]
                m = current_mask["mask"].bool()
                keys = k[m].double()                            # [tokens, d_in]
                sums[layer] = sums.get(layer, 0) + keys.T @ keys
                if layer == deepest:
                    raise _Stop
            return hook

        handles = [lm.adapter.module(lm.model, lm.adapter.mlp_name(layer)).register_forward_hook(make_hook(layer))
                   for layer in layers]
        pad = lm.tokenizer.pad_token_id
        try:
            bar = tqdm(total=sum(map(len, chunks)), desc=f"key statistics L{','.join(map(str, layers))}",
                       unit="tok", disable=not self.progress, leave=False)
            for s in range(0, len(chunks), self.batch_size):
                batch = chunks[s:s + self.batch_size]
                ids, mask = pad_batch(batch, pad, device=lm.device)
                current_mask["mask"] = mask
                try:
                    lm.model(input_ids=ids, attention_mask=mask)
                except _Stop:
                    pass
                n = int(mask.sum())
                count += n
                bar.update(n)
            bar.close()
        finally:
            for h in handles:
                h.remove()
        return {layer: ((sums[layer] / count).float().cpu(), count) for layer in layers}
