"""Known facts for causal tracing: ROME's ``known_1000.json`` format (``known_id``, ``subject``, ``attribute``,
``prompt``, optional ``template``, ``prediction``, ``relation_id``).

Sets: ``known`` (ROME's file, ``counterfact/known_1000.json`` in the data dir), ``builtin-known`` (41 facts written for
this project, each checked to be the top-1 next token of the embedded SmolLM2-135M-Instruct, fp32) or a file path.
``auto``: ``known`` when the data dir has it, else ``builtin-known``. A malformed record is a one-line
:class:`DataError` naming the file, the record and the field.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .loaders import (
    BUILTIN_DIR,
    DATA_DIR_ENV,
    DataError,
    read_json_records,
    resolve_data_dir,
)

KNOWN_FILE = "counterfact/known_1000.json"
BUILTIN_KNOWN = "known_facts.json"


@dataclass(frozen=True)
class KnownFact:
    """A fact the model is expected to know: ``prompt`` (holding ``subject``) is completed by ``attribute``."""

    case_id: str
    subject: str
    prompt: str
    attribute: str
    relation_id: str | None = None
    source: str = ""


def _field(rec: Any, key: str, where: str) -> str:
    value = rec.get(key) if isinstance(rec, dict) else None
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: field '{key}' is missing or not a non-empty string; fix the record")
    return value


def parse_known_facts(records: list[Any], name: str, source: str) -> list[KnownFact]:
    facts = []
    for i, rec in enumerate(records):
        rid = rec.get("known_id", rec.get("case_id")) if isinstance(rec, dict) else None
        where = f"{name} record {i}" + (f" (known_id {rid})" if rid is not None else "")
        if not isinstance(rec, dict):
            raise DataError(f"{where}: should be a JSON object, got {type(rec).__name__}; fix the record")
        subject, prompt = _field(rec, "subject", where), _field(rec, "prompt", where)
        attribute = _field(rec, "attribute", where).strip()
        if subject not in prompt:
            raise DataError(f"{where}: field 'prompt' does not contain the subject {subject!r}; fix the record")
        rel = rec.get("relation_id")
        facts.append(KnownFact(str(rid if rid is not None else i), subject, prompt, attribute,
                               rel if isinstance(rel, str) else None, source))
    return facts


def known_facts_path(spec: str, data_dir: str | os.PathLike[str] | None = None) -> tuple[Path, str]:
    """The file behind a known-facts spec and its source name."""
    if spec == "auto":
        root = resolve_data_dir(data_dir)
        spec = "known" if root is not None and (root / KNOWN_FILE).is_file() else "builtin-known"
    if spec == "builtin-known":
        return BUILTIN_DIR / BUILTIN_KNOWN, spec
    if spec == "known":
        root = resolve_data_dir(data_dir)
        if root is None:
            raise DataError(f"known facts 'known' need a data dir: pass --data-dir DIR (or set {DATA_DIR_ENV}) "
                            f"pointing at a folder with {KNOWN_FILE}, or use --known-facts builtin-known")
        path = root / KNOWN_FILE
        if not path.is_file():
            raise DataError(f"known facts 'known': {path} not found; pass --data-dir DIR with {KNOWN_FILE} "
                            "or use --known-facts builtin-known")
        return path, spec
    path = Path(spec).expanduser()
    if not path.is_file():
        raise DataError(f"known facts {spec!r}: not 'auto', 'known', 'builtin-known' or an existing JSON file")
    return path, path.stem


def load_known_facts(spec: str = "auto", *, data_dir: str | os.PathLike[str] | None = None,
                     limit: int | None = None) -> list[KnownFact]:
    """Known facts from a named set or a file (every record validated; the first ``limit`` returned)."""
    path, source = known_facts_path(spec, data_dir)
    facts = parse_known_facts(read_json_records(path), path.name, source)
    return facts if limit is None else facts[:limit]
