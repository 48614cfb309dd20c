"""General text for perplexity and key (second-moment) statistics: built-in passages, ME-PPL, WikiText, files."""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import unicodedata
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .loaders import BUILTIN_DIR, DATA_DIR_ENV, DataError, read_json_records, resolve_data_dir

# named corpora that live in the data dir: spec -> path relative to it
NAMED_CORPORA: dict[str, str] = {
    "me-ppl-50": "collapse/ME-PPL_50.json",
    "me-ppl-1k": "collapse/ME-PPL_1k.json",
    "me-ppl": "collapse/ME-PPL.json",
    "wikitext": "corpus/wikitext2_raw_test_joined.txt",
}

_BLANK_LINES = re.compile(r"\n[ \t]*\n")


# text sampled from the model itself (``model_sample_texts``): the key statistics' default without a data dir
MODEL_SAMPLES = "model-samples"


def corpus_names() -> list[str]:
    """Named corpora accepted by :func:`load_texts` (besides .txt/.json/.jsonl paths and Hugging Face datasets,
    ``hf:NAME[:CONFIG[:SPLIT[:COLUMN]]]``: harness/data/hub.py); ``model-samples`` needs the model
    (``model_sample_texts``)."""
    return ["builtin", "builtin-sentences", MODEL_SAMPLES, *NAMED_CORPORA]


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")


def builtin_sentences() -> list[str]:
    """The built-in passages cut into sentences of at least six words: short general texts like ME-PPL's
    (mean 22 words), taken round-robin across passages so any prefix of the list mixes genres."""
    per_passage = [[s for s in _SENTENCE_END.split(p) if len(s.split()) >= 6]
                   for p in _read_file(BUILTIN_DIR / "passages.json")]
    out: list[str] = []
    for i in range(max(map(len, per_passage))):
        out += [sents[i] for sents in per_passage if i < len(sents)]
    return out


def split_paragraphs(text: str) -> list[str]:
    """Non-empty paragraphs separated by blank lines, stripped; paragraphs starting with "=" (WikiText headings
    such as `` = Title = `` and a few table legends) are dropped."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    out = []
    for para in _BLANK_LINES.split(text):
        para = para.strip()
        if para and not para.startswith("="):
            out.append(para)
    return out


def _texts_from_json(items: list[Any], name: str) -> list[str]:
    texts: list[str] = []
    for i, item in enumerate(items):
        if isinstance(item, dict):
            value = item.get("Text", item.get("text"))
            if not isinstance(value, str):
                raise DataError(f"{name} record {i}: field 'Text' (or 'text') is missing or not a string; "
                                "pass a list of strings or of objects with a 'Text' field")
        elif isinstance(item, str):
            value = item
        else:
            raise DataError(f"{name} record {i}: expected a string or an object with 'Text', "
                            f"got {type(item).__name__}")
        if value.strip():
            texts.append(value)
    return texts


def _read_file(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.suffix in (".json", ".jsonl"):
        return _texts_from_json(read_json_records(path), path.name)
    try:
        return split_paragraphs(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read text file ({' '.join(str(e).split())})") from e


def load_texts(spec: str, *, data_dir: str | os.PathLike[str] | None = None, limit: int | None = None,
               max_chars: int | None = None) -> list[str]:
    """Texts for ``spec``: 'builtin', 'me-ppl-50' / 'me-ppl-1k' / 'me-ppl' (field "Text", kept verbatim),
    'wikitext' (paragraphs), a .txt path (paragraphs), a .json/.jsonl path (strings or {"Text"/"text"}), or
    ``hf:NAME[:CONFIG[:SPLIT[:COLUMN]]]`` (a Hugging Face dataset: hub id or a folder saved with ``save_to_disk``;
    its non-empty rows, read until ``limit`` rows or ``max_chars`` characters, harness/data/hub.py)."""
    spec = str(spec)
    if limit is not None and limit < 0:
        raise DataError(f"limit must be >= 0, got {limit}")
    if spec.startswith("hf:"):
        from .hub import load_hf_spec
        return load_hf_spec(spec, limit=limit, max_chars=max_chars)
    if spec == MODEL_SAMPLES:
        raise DataError(f"corpus {spec!r} is sampled from the model: use model_sample_texts(lm, ...) "
                        "(the key statistics do), or name a text corpus")
    if spec == "builtin":
        texts = _read_file(BUILTIN_DIR / "passages.json")
    elif spec == "builtin-sentences":
        texts = builtin_sentences()
    elif spec in NAMED_CORPORA:
        rel = NAMED_CORPORA[spec]
        root = resolve_data_dir(data_dir)
        if root is None:
            raise DataError(f"corpus {spec!r} needs a data dir: pass --data-dir DIR (or set {DATA_DIR_ENV}) "
                            f"pointing at a folder with {rel}")
        path = root / rel
        if not path.is_file():
            raise DataError(f"corpus {spec!r}: {path} not found; pass --data-dir DIR (or set {DATA_DIR_ENV}) "
                            f"pointing at a folder with {rel}")
        texts = _read_file(path)
    else:
        path = Path(spec).expanduser()
        if path.suffix not in (".txt", ".json", ".jsonl"):
            raise DataError(f"unknown corpus {spec!r}: use one of {', '.join(corpus_names())}, "
                            "a .txt / .json / .jsonl file path, or hf:NAME[:CONFIG[:SPLIT]] (Hugging Face datasets)")
        texts = _read_file(path)
    return texts[:limit] if limit is not None else texts


def _has(data_dir: str | os.PathLike[str] | None, spec: str) -> bool:
    root = resolve_data_dir(data_dir)
    return root is not None and (root / NAMED_CORPORA[spec]).is_file()


def default_ppl_corpus(data_dir: str | os.PathLike[str] | None = None) -> str:
    """'me-ppl-50' when the data dir holds it, else 'builtin-sentences' (short texts, like ME-PPL's)."""
    return "me-ppl-50" if _has(data_dir, "me-ppl-50") else "builtin-sentences"


def default_stats_corpus(data_dir: str | os.PathLike[str] | None = None) -> str:
    """'wikitext' when the data dir holds it, else 'model-samples' (text sampled from the model: as many tokens as
    the statistics ask for; the built-in passages hold only about 7k tokens)."""
    return "wikitext" if _has(data_dir, "wikitext") else MODEL_SAMPLES


# --- text sampled from the model ---------------------------------------------------------------------------
def sample_ids(model, ids, max_out_len: int, top_k: int | None = 5, generator=None, temperature: float = 1.0,
               on_step=None):
    """ids [b, n] (no padding) continued to [b, max_out_len]: every new token drawn from the softmax of the logits /
    ``temperature``, restricted to the ``top_k`` most likely (None: the whole vocabulary); no nucleus, no repetition
    penalty, no stop at end-of-text, whatever the model's ``generation_config`` says (ROME's ``generate_fast``).
    ``on_step(n)``: called after each forward with the number of tokens it ran (progress)."""
    import torch

    from ..models.kvcache import cache_arg, returned_cache

    step_in, cache = ids, None
    with torch.no_grad():
        while ids.shape[1] < max_out_len:
            o = model(input_ids=step_in, **cache_arg(model, cache), use_cache=True)
            if on_step is not None:
                on_step(step_in.numel())
            cache = returned_cache(o)
            probs = torch.softmax(o.logits[:, -1].float() / temperature, dim=-1)       # [b, V]
            if top_k:
                top_p, top_i = torch.topk(probs, top_k, dim=-1)                        # [b, k]
                pick = torch.multinomial(top_p / top_p.sum(1, keepdim=True), 1, generator=generator)
                step_in = top_i.gather(1, pick)                                        # [b, 1]
            else:
                step_in = torch.multinomial(probs, 1, generator=generator)             # [b, 1]
            ids = torch.cat([ids, step_in], dim=1)
    return ids


def _decode(tok, seq: Sequence[int]) -> str:
    """Sampled ids as text: without special tokens (the reference deletes GPT-2's only one, ``<|endoftext|>``),
    NFKD-normalised, blank lines folded, the leading space kept."""
    return unicodedata.normalize("NFKD", tok.decode(seq, skip_special_tokens=True)).replace("\n\n", " ")


def sample_continuations(lm, prompts: Sequence[str], max_out_len: int, top_k: int | None = 5,
                         generator=None, temperature: float = 1.0) -> list[str]:
    """Each prompt continued by the model until it is ``max_out_len`` tokens long (prompt included), by
    ``sample_ids`` (ROME's ``generate_fast`` with ``top_k=5``). The prompts' tokens are the tokenizer's (special
    tokens included, as the reference's). Decoded by ``_decode``. Prompts of different token lengths are sampled in
    groups of equal length (no padding). ``lm``: a loaded model (``model``, ``tokenizer``, ``device``)."""
    import torch

    tok = lm.tokenizer
    encoded = [tok(p).input_ids for p in prompts]
    out: list[str] = [""] * len(prompts)
    for length in sorted({len(e) for e in encoded}):
        rows = [i for i, e in enumerate(encoded) if len(e) == length]
        ids = torch.tensor([encoded[i] for i in rows], device=lm.device)               # [b, length]
        ids = sample_ids(lm.model, ids, max_out_len, top_k, generator, temperature)
        for r, seq in zip(rows, ids.tolist()):
            out[r] = _decode(tok, seq)
    return out


# settings of the model-sampled corpus; part of its cache key (change any and the text is sampled again).
# version 2: the token ids are kept (the statistics read them, no re-tokenisation); every prompt is the first
# ``prompt_tokens`` tokens of a built-in sentence, so all sequences sample together in batches of equal size (version
# 1 cut prompts at 4 words, which split a batch into groups of one token length each: small, slow batches); each
# sequence is the ``seq_len`` tokens the model was run on.
SAMPLE_SETTINGS: dict[str, Any] = {"seq_len": 256, "top_k": None, "temperature": 1.0, "seed": 0,
                                   "prompt_tokens": 4, "batch_size": 128, "version": 2}


@dataclass
class ModelSamples:
    """Text sampled from the model: ``ids[i]`` the ``seq_len`` tokens sequence i was run on (a short prompt and the
    model's own continuation), ``texts[i]`` their decoded text, ``key`` what they were sampled with."""

    ids: list[list[int]]
    texts: list[str]
    key: dict

    @property
    def n_tokens(self) -> int:
        return sum(map(len, self.ids))

    def digest(self) -> str:
        """SHA-256 of the token ids (what the statistics are computed from)."""
        return hashlib.sha256(json.dumps(self.ids, separators=(",", ":")).encode()).hexdigest()


def model_samples_key(lm, n_tokens: int, settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a model-sampled corpus is determined by: the settings, the seed, the token count and the model."""
    return {**SAMPLE_SETTINGS, **(settings or {}), "n_tokens": int(n_tokens),
            "model": lm.identity.get("fingerprint", "")}


def _samples_path(cache_dir, key: dict) -> Path | None:
    if not cache_dir:
        return None
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cache_dir) / "corpus" / (key["model"] or "unknown") / f"{MODEL_SAMPLES}-{digest}.json"


def read_model_samples(path: Path | None, key: dict) -> tuple[ModelSamples | None, str | None]:
    """The cached corpus at ``path`` when it is whole and of ``key``: (samples, None); else (None, what is wrong
    with the file, or None when there is no file)."""
    if path is None or not path.is_file():
        return None, None
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        samples = ModelSamples(saved["ids"], saved["texts"], saved["settings"])
        sha = saved["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, f"unreadable ({type(e).__name__})"
    if samples.key != key:
        return None, "of other settings"
    if not samples.ids or len(samples.ids) != len(samples.texts):
        return None, "empty or incomplete"
    if samples.digest() != sha:
        return None, "damaged (its token ids do not match its SHA-256)"
    return samples, None


def sample_model_text(lm, n_tokens: int, settings: dict[str, Any] | None = None, on_step=None) -> ModelSamples:
    """General text sampled from the model itself: ``ceil(n_tokens / seq_len)`` sequences of ``seq_len`` tokens,
    each the first ``prompt_tokens`` tokens of a built-in sentence (cycled, so topics and genres vary) continued by
    plain sampling at ``temperature`` from the whole vocabulary (``top_k`` None: an unbiased draw from the model's
    own distribution of text), in batches of equal size of at most ``batch_size``. Each sequence is drawn one token
    past ``seq_len`` and kept to the ``seq_len`` tokens the model was run on, so a forward hook on the model sees
    exactly the kept tokens while this runs (``LayerStats`` sums its key statistics that way, with no second pass).
    ``on_step(n)``: n tokens were just run."""
    import torch

    st = {**SAMPLE_SETTINGS, **(settings or {})}
    seq_len, tok, n_prompt = int(st["seq_len"]), lm.tokenizer, int(st["prompt_tokens"])
    starts = [ids[:n_prompt] for ids in (tok(s).input_ids for s in builtin_sentences()) if len(ids) >= n_prompt]
    n_seq = max(1, math.ceil(n_tokens / seq_len))
    prompts = [starts[i % len(starts)] for i in range(n_seq)]                          # n_seq x [prompt_tokens]
    n_batches = math.ceil(n_seq / int(st["batch_size"]))
    size = math.ceil(n_seq / n_batches)                                                # equal batches
    gen = torch.Generator(device=lm.device).manual_seed(int(st["seed"]))
    ids: list[list[int]] = []
    for s in range(0, n_seq, size):
        prompt = torch.tensor(prompts[s:s + size], device=lm.device)                   # [b, prompt_tokens]
        out = sample_ids(lm.model, prompt, seq_len + 1, st["top_k"], gen, st["temperature"], on_step)
        ids += out[:, :seq_len].tolist()                                               # [b, seq_len]
    key = model_samples_key(lm, n_tokens, settings)
    return ModelSamples(ids, [_decode(tok, seq) for seq in ids], key)


def write_model_samples(path: Path | None, samples: ModelSamples) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")   # xdist workers share the dir
    try:
        tmp.write_text(json.dumps({"settings": samples.key, "sha256": samples.digest(), "ids": samples.ids,
                                   "texts": samples.texts}), encoding="utf-8")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def model_samples(lm, n_tokens: int, cache_dir: str | os.PathLike[str] | None = None,
                  settings: dict[str, Any] | None = None, progress=None, sampling=None) -> ModelSamples:
    """The model-sampled corpus of ``n_tokens`` tokens: read from ``cache_dir/corpus/<model fingerprint>/`` when a
    whole file of the same key is there (a damaged, empty or foreign file is sampled again, with a one-line
    ``CacheWarning``), else sampled (``sample_model_text``) and cached. ``progress``: a ``harness.progress.Progress``.
    ``sampling``: a context manager entered around the sampling only (``LayerStats`` puts its key hooks there)."""
    import warnings

    from ..models.loading import CacheWarning
    from ..progress import Progress

    progress = progress or Progress.silent()
    key = model_samples_key(lm, n_tokens, settings)
    path = _samples_path(cache_dir, key)
    samples, problem = read_model_samples(path, key)
    if samples is not None:
        return samples
    with _sampling_lock(path, progress):        # xdist workers sharing a cache sample it once, not each
        samples, problem = read_model_samples(path, key)
        if samples is not None:                 # another process sampled it while this one waited
            return samples
        if problem is not None:
            warnings.warn(f"model-sampled corpus {path} is {problem}; sampling it again", CacheWarning,
                          stacklevel=2)
        st = {**SAMPLE_SETTINGS, **(settings or {})}
        total = max(1, math.ceil(n_tokens / st["seq_len"])) * st["seq_len"]
        with progress.step("sampling text from the model for key statistics", total=total, unit="tok",
                           note="once per model, then cached") as bar, (sampling or contextlib.nullcontext()):
            samples = sample_model_text(lm, n_tokens, settings, on_step=bar.update)
        write_model_samples(path, samples)
    return samples


@contextlib.contextmanager
def _sampling_lock(path: Path | None, progress):
    """An exclusive lock on ``path``'s ``.lock`` file (POSIX ``flock``; released when the process dies): one process
    samples, the others wait and then read its file. No cache dir, or no ``fcntl``: no lock."""
    try:
        import fcntl
    except ImportError:                          # not POSIX
        fcntl = None
    if path is None or fcntl is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress.line("waiting for another process sampling the same text for key statistics ...")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def model_sample_texts(lm, n_tokens: int, cache_dir: str | os.PathLike[str] | None = None,
                       settings: dict[str, Any] | None = None, progress=None) -> list[str]:
    """The texts of ``model_samples`` (sampled once, cached)."""
    return model_samples(lm, n_tokens, cache_dir, settings, progress if not isinstance(progress, bool) else None).texts
