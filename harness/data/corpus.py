"""General text for perplexity and key (second-moment) statistics: built-in passages, ME-PPL, WikiText, files."""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import unicodedata
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
    """Named corpora accepted by :func:`load_texts` (besides .txt/.json/.jsonl paths); ``model-samples`` needs the
    model (``model_sample_texts``)."""
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


def load_texts(spec: str, *, data_dir: str | os.PathLike[str] | None = None, limit: int | None = None) -> list[str]:
    """Texts for ``spec``: 'builtin', 'me-ppl-50' / 'me-ppl-1k' / 'me-ppl' (field "Text", kept verbatim),
    'wikitext' (paragraphs), a .txt path (paragraphs) or a .json/.jsonl path (strings or {"Text"/"text"})."""
    spec = str(spec)
    if limit is not None and limit < 0:
        raise DataError(f"limit must be >= 0, got {limit}")
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
                            "or a .txt / .json / .jsonl file path")
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
def sample_ids(model, ids, max_out_len: int, top_k: int | None = 5, generator=None, temperature: float = 1.0):
    """ids [b, n] (no padding) continued to [b, max_out_len]: every new token drawn from the softmax of the logits /
    ``temperature``, restricted to the ``top_k`` most likely (None: the whole vocabulary); no nucleus, no repetition
    penalty, no stop at end-of-text, whatever the model's ``generation_config`` says (ROME's ``generate_fast``)."""
    import torch

    from ..models.kvcache import cache_arg, returned_cache

    step_in, cache = ids, None
    with torch.no_grad():
        while ids.shape[1] < max_out_len:
            o = model(input_ids=step_in, **cache_arg(model, cache), use_cache=True)
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


def sample_continuations(lm, prompts: Sequence[str], max_out_len: int, top_k: int | None = 5,
                         generator=None, temperature: float = 1.0) -> list[str]:
    """Each prompt continued by the model until it is ``max_out_len`` tokens long (prompt included), by
    ``sample_ids`` (ROME's ``generate_fast`` with ``top_k=5``). The prompts' tokens are the tokenizer's (special
    tokens included, as the reference's). Decoded without special tokens (the reference deletes GPT-2's only one,
    ``<|endoftext|>``), NFKD-normalised, blank lines folded, the leading space kept. Prompts of different token
    lengths are sampled in groups of equal length (no padding). ``lm``: a loaded model (``model``, ``tokenizer``,
    ``device``)."""
    import torch

    tok = lm.tokenizer
    encoded = [tok(p).input_ids for p in prompts]
    out: list[str] = [""] * len(prompts)
    for length in sorted({len(e) for e in encoded}):
        rows = [i for i, e in enumerate(encoded) if len(e) == length]
        ids = torch.tensor([encoded[i] for i in rows], device=lm.device)               # [b, length]
        ids = sample_ids(lm.model, ids, max_out_len, top_k, generator, temperature)
        for r, seq in zip(rows, ids.tolist()):
            text = unicodedata.normalize("NFKD", tok.decode(seq, skip_special_tokens=True))
            out[r] = text.replace("\n\n", " ")
    return out


# settings of the model-sampled corpus; part of its cache key (change any and the text is sampled again)
SAMPLE_SETTINGS: dict[str, Any] = {"seq_len": 256, "top_k": None, "temperature": 1.0, "seed": 0,
                                   "prompt_words": 4, "batch_size": 64, "version": 1}


def model_sample_texts(lm, n_tokens: int, cache_dir: str | os.PathLike[str] | None = None,
                       settings: dict[str, Any] | None = None, progress: bool = False) -> list[str]:
    """General text sampled from the model itself, about ``n_tokens`` tokens in sequences of ``seq_len`` tokens:
    each sequence starts with the first ``prompt_words`` words of a built-in sentence (cycled, so topics and
    genres vary) and continues by plain sampling at temperature 1 from the whole vocabulary (an unbiased draw from
    the model's own distribution of text). Generated once and cached as JSON under
    ``cache_dir/corpus/<model fingerprint>/``, keyed by the settings, the seed and the token count."""
    import torch

    st = {**SAMPLE_SETTINGS, **(settings or {})}
    key = {**st, "n_tokens": int(n_tokens), "model": lm.identity.get("fingerprint", "")}
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    path = (Path(cache_dir) / "corpus" / (key["model"] or "unknown") / f"{MODEL_SAMPLES}-{digest}.json"
            if cache_dir else None)
    if path is not None and path.is_file():
        try:
            return json.loads(path.read_text(encoding="utf-8"))["texts"]
        except (OSError, ValueError, KeyError):
            pass                                                    # unreadable: sample again and overwrite
    words = [" ".join(s.split()[: st["prompt_words"]]) for s in builtin_sentences()]
    n_seq = math.ceil(n_tokens / (st["seq_len"] - 8)) + 1         # a margin for the prompt and re-tokenisation
    prompts = [words[i % len(words)] for i in range(n_seq)]
    gen = torch.Generator(device=lm.device).manual_seed(int(st["seed"]))
    texts: list[str] = []
    for s in range(0, n_seq, st["batch_size"]):
        texts += sample_continuations(lm, prompts[s:s + st["batch_size"]], st["seq_len"], st["top_k"], gen,
                                      st["temperature"])
        if progress:
            print(f"\rsampling text for key statistics: {len(texts)}/{n_seq} sequences", end="", flush=True)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"settings": key, "texts": texts}), encoding="utf-8")
        tmp.replace(path)
    return texts
