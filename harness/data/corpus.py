"""General text for perplexity and key (second-moment) statistics: built-in passages, ME-PPL, WikiText, files."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from .loaders import BUILTIN_DIR, DATA_DIR_ENV, DataError, read_json_records, resolve_data_dir

# named corpora that live in the data dir: spec -> path relative to it
NAMED_CORPORA: dict[str, str] = {
    "me-ppl-50": "collapse/ME-PPL_50.json",
    "me-ppl-1k": "collapse/ME-PPL_1k.json",
    "me-ppl": "collapse/ME-PPL.json",
    "wikitext": "corpus/wikitext2_raw_test_joined.txt",
}

_BLANK_LINES = re.compile(r"\n[ \t]*\n")


def corpus_names() -> list[str]:
    """Named corpora accepted by :func:`load_texts` (besides .txt/.json/.jsonl paths)."""
    return ["builtin", "builtin-sentences", *NAMED_CORPORA]


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
    """'wikitext' when the data dir holds it, else 'builtin'."""
    return "wikitext" if _has(data_dir, "wikitext") else "builtin"
