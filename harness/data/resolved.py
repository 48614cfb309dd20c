"""What the data resolvers resolved: a dataset spec or a corpus spec, the file it became (with its sha256) and a
digest of the content actually used, returned by the resolver together with what it loaded. The session keeps these
records (``HarnessSession.resolved``); provenance records exactly them, and the sequential run's resume key and
``harness compare``'s like-for-like check read the same digests (:func:`key_parts`), so that no part of the harness
resolves a spec a second time and drifts from what ran."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# the digest fields of a record: ``sha256`` (the file read or, with no file, the content) and ``content_sha256``
# (what was used of it: the texts, the cases, the statistics corpus)
DIGEST_FIELDS = ("sha256", "content_sha256")


def content_digest(obj: Any) -> str:
    """SHA-256 of a JSON rendering of ``obj`` (keys sorted; what JSON cannot hold, as its str)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def texts_digest(texts: Sequence[str] | None) -> str | None:
    """SHA-256 of a list of texts (None: not given)."""
    return None if texts is None else content_digest(list(texts))


def cases_digest(cases: Sequence[Any]) -> str:
    """SHA-256 of the cases' content: every field, ``extra`` (a format's own data: KnowEdit portability, ...) too."""
    return content_digest([dataclasses.asdict(c) for c in cases])


@dataclasses.dataclass(frozen=True)
class Resolved:
    """One resolution: ``spec`` (what was asked), ``kind``, ``path`` (the file read, None for generated or hub
    texts), ``sha256`` (of that file, or of the content where there is no file) and ``extra`` (what was used of it,
    ``content_sha256`` among them)."""
    spec: str | None
    kind: str | None
    path: Path | None
    sha256: str | None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def content_sha256(self) -> str | None:
        return self.extra.get("content_sha256")

    def record(self) -> dict[str, Any]:
        """The provenance record (a plain dict, JSON-ready)."""
        return {"spec": self.spec, "kind": self.kind, "path": None if self.path is None else str(self.path),
                "sha256": self.sha256, **self.extra}


# --- what a spec resolves to (as the loaders resolve it); provenance re-exports these ----------------------
def sha256_file(path: str | os.PathLike[str] | None) -> str | None:
    """Hex sha256 of a file's bytes (streamed); None when there is no such readable file."""
    if path is None:
        return None
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


def dataset_file(spec: str, data_dir: str | os.PathLike[str] | None) -> tuple[str, Path | None]:
    """(kind, file) a dataset spec resolves to, as ``load_cases`` resolves it: builtin, named (in the data dir),
    hub (no local file) or file."""
    from .loaders import BUILTIN_DIR, BUILTIN_SETS, NAMED_SETS, resolve_data_dir

    if spec in BUILTIN_SETS:
        return "builtin", BUILTIN_DIR / BUILTIN_SETS[spec]
    if spec in NAMED_SETS:
        root = resolve_data_dir(data_dir)
        return spec, (root / NAMED_SETS[spec]) if root is not None else None
    if spec.startswith("hf:"):
        return "hub", None
    from .loaders import PREFIX_LOADERS
    prefix, sep, rest = spec.partition(":")
    if sep and rest and prefix in PREFIX_LOADERS:      # ``knowedit:FILE``: the file after the prefix, as load_cases
        return prefix, Path(rest).expanduser()
    return "file", Path(spec).expanduser()


def corpus_file(spec: str, data_dir: str | os.PathLike[str] | None) -> Path | None:
    """The file a corpus spec resolves to (as ``load_texts``); None for generated or unresolvable texts."""
    from .corpus import NAMED_CORPORA
    from .loaders import BUILTIN_DIR, resolve_data_dir

    if spec == "builtin":
        return BUILTIN_DIR / "passages.json"
    if spec == "builtin-sentences":
        return None
    if spec in NAMED_CORPORA:
        root = resolve_data_dir(data_dir)
        return root / NAMED_CORPORA[spec] if root is not None else None
    return Path(spec).expanduser()


def _corpus_kind(spec: str, path: Path | None) -> str:
    from .corpus import NAMED_CORPORA
    if spec in ("builtin", "builtin-sentences"):
        return "builtin" if path is not None else "generated"
    if str(spec).startswith("hf:"):
        return "hub"
    return "named" if spec in NAMED_CORPORA else "file"


def texts_resolved(spec: str | None, data_dir: str | os.PathLike[str] | None, texts: Sequence[str] | None,
                   **used: Any) -> Resolved:
    """The record of corpus ``spec`` whose ``texts`` were loaded: its file and sha256 (for generated or ``hf:``
    texts, the content's digest), the number of texts and their digest. ``spec`` None: texts whose spec is not
    known here (no file is resolved)."""
    content = texts_digest(texts)
    extra: dict[str, Any] = {}
    if spec is None:
        path, kind, sha = None, None, content
    elif str(spec).startswith("hf:"):
        from .hub import hf_provenance
        hub = hf_provenance(spec)
        path = Path(hub["path"]) if hub.get("path") else None
        kind = hub.get("kind") or "hub"
        sha = hub.get("sha256") or content
        extra.update({k: v for k, v in hub.items() if k not in ("kind", "path", "sha256")})
    else:
        path = corpus_file(str(spec), data_dir)
        kind = _corpus_kind(str(spec), path)
        sha = sha256_file(path) if path is not None else content
    extra.update(used)
    extra.update(texts=None if texts is None else len(texts), content_sha256=content)
    return Resolved(None if spec is None else str(spec), kind, path, sha, extra)


def resolve_texts(spec: str, *, data_dir: str | os.PathLike[str] | None = None, limit: int | None = None,
                  max_chars: int | None = None, **used: Any) -> tuple[list[str], Resolved]:
    """``load_texts`` of ``spec`` and the record of what it read (:func:`texts_resolved`)."""
    from . import corpus
    texts = corpus.load_texts(spec, data_dir=data_dir, limit=limit, max_chars=max_chars)
    return texts, texts_resolved(spec, data_dir, texts, **used)


def cases_resolved(spec: str | None, data_dir: str | os.PathLike[str] | None, cases: Sequence[Any],
                   requested: str | None = None) -> Resolved:
    """The record of dataset ``spec`` whose ``cases`` were loaded: kind, file and sha256, case ids and the cases'
    content digest. ``spec`` None: cases whose spec is not known here (no file is resolved)."""
    kind, path = dataset_file(str(spec), data_dir) if spec is not None else (None, None)
    ids = [str(c.case_id) for c in cases]
    return Resolved(None if spec is None else str(spec), kind, path, sha256_file(path),
                    {"requested": requested or spec, "n_cases": len(ids), "case_ids": ids,
                     "content_sha256": cases_digest(cases)})


def stats_resolved(stats: Any, data_dir: str | os.PathLike[str] | None = None, files: bool = True) -> Resolved:
    """The record of a ``LayerStats``' corpus: its file (and sha256) for a file corpus, the resolved token count and
    the corpus digest its cache is keyed by (``corpus_digest()``, ``content_sha256``; for model samples also the
    ``sha256``: there is no file). ``files=False``: the corpus, tokens and digest only, no file resolved or hashed
    (all a resume key reads, ``key_parts``)."""
    name = getattr(stats, "corpus_name", None)
    spec = "" if name is None else str(name)
    extra: dict[str, Any] = {"tokens_requested": getattr(stats, "n_tokens", None)}
    try:
        extra["content_sha256"] = stats.corpus_digest()
    except Exception as e:  # noqa: BLE001 - an unreadable corpus fails the editor that needs it, not the record
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        extra.update(content_sha256=None, error=f"{type(e).__name__}: {first}")
    from ..stats import MODEL_SAMPLES
    if not files:
        return Resolved(spec, None, None, None, extra)
    if spec == MODEL_SAMPLES:
        return Resolved(spec, "model-samples", None, extra["content_sha256"], extra)
    if spec.startswith("hf:"):
        from .hub import hf_provenance
        hub = hf_provenance(spec)
        extra.update({k: v for k, v in hub.items() if k not in ("kind", "path", "sha256")})
        return Resolved(spec, hub.get("kind") or "hub", Path(hub["path"]) if hub.get("path") else None,
                        hub.get("sha256") or extra["content_sha256"], extra)
    path = corpus_file(spec, data_dir)
    return Resolved(spec, _corpus_kind(spec, path), path,
                    sha256_file(path) if path is not None else extra["content_sha256"], extra)


def _record(r: Any) -> dict[str, Any] | None:
    return r.record() if isinstance(r, Resolved) else r


def key_parts(records: dict[str, Any]) -> dict[str, Any]:
    """The parts of a sequential run's resume key that come from resolved data, from the records (``Resolved`` or
    their provenance dicts): ``ppl_texts`` (the perplexity texts' digest), ``stats`` (corpus, tokens and corpus
    digest of the key statistics; None without) and ``cases`` (the cases' content digest)."""
    ppl, stats, data = (_record(records.get(k)) for k in ("perplexity", "statistics", "dataset"))
    out: dict[str, Any] = {"ppl_texts": (ppl or {}).get("content_sha256")}
    if stats is None:
        out["stats"] = None
    else:
        digest = stats.get("content_sha256")
        out["stats"] = {"corpus": stats.get("spec") or None, "n_tokens": stats.get("tokens_requested"),
                        "corpus_sha256": digest if digest is not None
                        else f"unreadable ({str(stats.get('error'))[:80]})"}
    if data is not None:
        out["cases"] = data.get("content_sha256")
    return out
