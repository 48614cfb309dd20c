"""Text corpora through Hugging Face ``datasets``: ``hf:NAME[:CONFIG[:SPLIT[:COLUMN]]]`` for ``--stats-corpus`` and
``--ppl-corpus`` (docs/hf-corpora.md).

NAME is a hub id (``wikitext``, ``owner/name``), a local folder written by ``Dataset.save_to_disk`` /
``DatasetDict.save_to_disk`` (read with ``datasets.load_from_disk``), or a local folder of data files (read with
``datasets.load_dataset``). CONFIG may be empty (``hf:DIR::test``); SPLIT defaults to ``train``; COLUMN defaults to
``text``, else the dataset's only string column. A hub dataset is downloaded whole into the datasets cache the first
time (as the reference ROME does with Wikipedia), then read from the cache, offline too; of it only as many rows
are read as the caller needs (``limit`` rows, ``max_chars`` characters). Every failure is a :class:`DataError` of
one line naming the cause and the fix.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator, NamedTuple

from .loaders import DataError, _one_line

PREFIX = "hf:"
FORM = "hf:NAME[:CONFIG[:SPLIT[:COLUMN]]]"
DEFAULT_SPLIT = "train"
# characters read when the caller gives neither a row limit nor a character budget (about 5M tokens of English)
DEFAULT_MAX_CHARS = 20_000_000
DATA_DIR_HINT = "--data-dir DIR for WikiText-2 or ME-PPL"
_TRUE = {"1", "ON", "YES", "TRUE"}


class HFSpec(NamedTuple):
    name: str
    config: str | None
    split: str
    column: str | None


def _error(label: str | None, reason: str) -> DataError:
    return DataError(f"{label}: {reason}" if label else reason)


def hf_spec(spec: str, label: str | None = None) -> HFSpec:
    """``hf:NAME[:CONFIG[:SPLIT[:COLUMN]]]`` -> HFSpec; empty CONFIG -> None, empty SPLIT -> ``train``."""
    spec = str(spec)
    label = spec if label is None else label
    if not spec.startswith(PREFIX):
        raise _error(label, f"expected {FORM}")
    parts = spec[len(PREFIX):].split(":")
    name = parts[0].strip()
    if not name:
        raise _error(label, f"no dataset NAME: expected {FORM} (NAME: a hub id such as wikitext, or a folder "
                            "saved with datasets.save_to_disk)")
    if len(parts) > 4:
        raise _error(label, f"{len(parts) - 1} fields after NAME, at most 3: expected {FORM} (split slices such "
                            "as train[:100] are not accepted: the rows read are limited by the run)")
    if any(any(c.isspace() for c in p) for p in parts):
        raise _error(label, f"white space in a field: expected {FORM}")
    config, split, column = (parts[1:] + [""] * 3)[:3]
    return HFSpec(name, config or None, split or DEFAULT_SPLIT, column or None)


def parse_hf_spec(spec: str) -> tuple[str, str | None, str]:
    """``hf:NAME[:CONFIG[:SPLIT]]`` -> (name, config, split), split ``train`` by default (a 4th field, the text
    column, is accepted: see :func:`hf_spec`). DataError of one line when malformed."""
    return hf_spec(spec)[:3]


def format_spec(name: str, config: str | None = None, split: str = DEFAULT_SPLIT, column: str | None = None) -> str:
    fields = [name, config or "", split if split != DEFAULT_SPLIT or column else "", column or ""]
    while len(fields) > 1 and not fields[-1]:
        fields.pop()
    return PREFIX + ":".join(fields)


# --- where a dataset is ------------------------------------------------------------------------------------
def _local_dir(name: str, label: str | None) -> Path | None:
    """NAME as a local folder; None for a hub id; DataError for a path that is not a folder."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    looks_like_path = name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1
    if looks_like_path or path.exists():
        raise _error(label, f"{path} is not a folder: pass a folder saved with datasets.save_to_disk "
                            "(hf:/path/to/dir) or a hub id such as wikitext")
    return None


def _is_saved(path: Path) -> bool:
    """A folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    return (path / "dataset_dict.json").is_file() or ((path / "state.json").is_file()
                                                      and (path / "dataset_info.json").is_file())


def _env_offline() -> bool:
    """The offline switch as ``datasets`` reads it (HF_DATASETS_OFFLINE, else HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE),
    but from the environment now rather than when ``datasets`` was imported."""
    ds = os.environ.get("HF_DATASETS_OFFLINE")
    if ds is not None:
        return ds.strip().upper() in _TRUE
    return any((os.environ.get(k) or "").strip().upper() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _offline(datasets: Any) -> bool:
    return _env_offline() or bool(getattr(datasets.config, "HF_HUB_OFFLINE", False))


@contextlib.contextmanager
def _offline_as_env(datasets: Any) -> Iterator[None]:
    """``datasets`` and ``huggingface_hub`` read HF_HUB_OFFLINE once, at import: one set later (a test, a launcher)
    is applied for the duration of the call, so an offline run never reaches for the network."""
    if not _env_offline() or datasets.config.HF_HUB_OFFLINE:
        yield
        return
    from huggingface_hub import constants
    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


def _import_datasets(label: str | None) -> Any:
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError:
        raise _error(label, "needs the 'datasets' package: pip install datasets (or the downstream extra: "
                            "pip install 'knowedit-harness[downstream]')") from None
    return datasets


def _unavailable(e: Exception, s: HFSpec, label: str | None, datasets: Any, hint: str,
                 local: Path | None) -> DataError:
    """A load failure as one line: offline and not cached, hub unreachable, no such dataset/config/split."""
    detail = _one_line(e)[:300]
    fix = (f"run once online, or pass a local folder saved with datasets.save_to_disk (hf:/path/to/dir), "
           f"or {hint}")
    exc = type(e).__name__
    if local is not None:
        return _error(label, f"cannot load the folder {local} with datasets.load_dataset ({exc}: {detail}); pass a "
                             "folder saved with datasets.save_to_disk, or one of data files (.txt, .json, .parquet)")
    if _offline(datasets) and (isinstance(e, (ConnectionError, FileNotFoundError)) or "offline" in detail.lower()):
        return _error(label, f"dataset not available offline (HF_HUB_OFFLINE=1 and not in the datasets cache); {fix}")
    if isinstance(e, ConnectionError) or "couldn't reach" in detail.lower():
        return _error(label, f"the Hugging Face hub cannot be reached and the dataset is not in the datasets cache "
                             f"({detail}); {fix}")
    if isinstance(e, FileNotFoundError):
        return _error(label, f"no such dataset ({detail}); NAME is a hub id such as wikitext or a local folder "
                             f"saved with datasets.save_to_disk")
    if isinstance(e, (ValueError, KeyError)):
        return _error(label, f"cannot load ({exc}: {detail}); check CONFIG and SPLIT: {FORM}")
    return _error(label, f"cannot load ({exc}: {detail})")


def _open(datasets: Any, s: HFSpec, label: str | None, hint: str) -> Any:
    """The split as a map-style Dataset (memory-mapped: nothing is read yet)."""
    path = _local_dir(s.name, label)
    if path is not None and _is_saved(path):
        try:
            obj = datasets.load_from_disk(str(path))
        except Exception as e:  # noqa: BLE001 - a damaged or foreign folder, reported in one line
            raise _error(label, f"cannot read {path} as a folder saved with datasets.save_to_disk "
                                f"({type(e).__name__}: {_one_line(e)[:300]})") from None
        if isinstance(obj, datasets.DatasetDict):
            if s.split not in obj:
                raise _error(label, f"no split {s.split!r} in {path} (splits: {', '.join(obj)}); choose one: "
                                    f"{format_spec(s.name, s.config, 'SPLIT')}")
            return obj[s.split]
        return obj
    try:
        with _offline_as_env(datasets):
            return datasets.load_dataset(str(path) if path is not None else s.name, s.config, split=s.split)
    except Exception as e:  # noqa: BLE001 - network, cache, name, config, split: each mapped to one line
        raise _unavailable(e, s, label, datasets, hint, path) from None


def _text_column(features: Any, column: str | None, s: HFSpec, label: str | None) -> str:
    """COLUMN if given, else ``text``, else the only string column; DataError naming the columns otherwise."""
    names = list(features)
    if column is not None:
        if column not in names:
            raise _error(label, f"no column {column!r} (columns: {', '.join(names)})")
        return column
    if "text" in names:
        return "text"
    strings = [n for n in names if getattr(features[n], "dtype", None) in ("string", "large_string")]
    if len(strings) == 1:
        return strings[0]
    which = f"{len(strings)} string columns" if strings else "no string column"
    raise _error(label, f"no 'text' column and {which} (columns: {', '.join(names) or 'none'}); name the text "
                        f"column as a 4th field: {format_spec(s.name, s.config, s.split, 'COLUMN')}")


# --- loading and checking ----------------------------------------------------------------------------------
def load_hf_texts(name: str, config: str | None = None, split: str = DEFAULT_SPLIT, limit: int | None = None, *,
                  column: str | None = None, max_chars: int | None = None, label: str | None = None,
                  hint: str = DATA_DIR_HINT) -> list[str]:
    """The non-empty texts of one split, in order, until ``limit`` rows or ``max_chars`` characters (with neither,
    :data:`DEFAULT_MAX_CHARS`): a long article is kept whole (the statistics cut it into token windows)."""
    s = HFSpec(name, config, split or DEFAULT_SPLIT, column)
    label = format_spec(*s) if label is None else label
    if limit is not None and limit < 0:
        raise _error(label, f"limit must be >= 0, got {limit}")
    datasets = _import_datasets(label)
    ds = _open(datasets, s, label, hint)
    col = _text_column(ds.features, column, s, label)
    budget = DEFAULT_MAX_CHARS if max_chars is None and limit is None else max_chars
    texts: list[str] = []
    chars = 0
    if limit == 0 or (budget is not None and budget <= 0):
        return texts
    for batch in ds.select_columns([col]).iter(batch_size=1000):
        for value in batch[col]:
            if not isinstance(value, str) or not value.strip():
                continue
            texts.append(value)
            chars += len(value)
            if (limit is not None and len(texts) >= limit) or (budget is not None and chars >= budget):
                return texts
    return texts


def load_hf_spec(spec: str, limit: int | None = None, max_chars: int | None = None) -> list[str]:
    """:func:`load_hf_texts` for an ``hf:`` spec."""
    s = hf_spec(spec)
    return load_hf_texts(s.name, s.config, s.split, limit, column=s.column, max_chars=max_chars, label=spec)


def check_hf_corpus(spec: str, label: str | None = None, hint: str = DATA_DIR_HINT) -> HFSpec:
    """Start-up check, downloading nothing: the spec's syntax; a saved folder's split and text column (its metadata,
    memory-mapped); for a hub id or a folder of data files, ``load_dataset_builder`` (with HF_HUB_OFFLINE=1 the
    datasets cache only) and, where the builder knows them, the split and the text column."""
    label = spec if label is None else label
    s = hf_spec(spec, label)
    datasets = _import_datasets(label)
    path = _local_dir(s.name, label)
    if path is not None and _is_saved(path):
        _text_column(_open(datasets, s, label, hint).features, s.column, s, label)
        return s
    try:
        with _offline_as_env(datasets):
            builder = datasets.load_dataset_builder(str(path) if path is not None else s.name, s.config)
    except Exception as e:  # noqa: BLE001
        raise _unavailable(e, s, label, datasets, hint, path) from None
    info = getattr(builder, "info", None)
    splits = list(getattr(info, "splits", None) or [])
    if splits and s.split not in splits:
        raise _error(label, f"no split {s.split!r} (splits: {', '.join(splits)}); choose one: "
                            f"{format_spec(s.name, s.config, 'SPLIT')}")
    features = getattr(info, "features", None)
    if features:
        _text_column(features, s.column, s, label)
    return s


# --- provenance --------------------------------------------------------------------------------------------
def hf_provenance(spec: str) -> dict[str, Any]:
    """What an ``hf:`` corpus was, without loading it: name, config, split and column; for a saved folder its path,
    the split's fingerprint (``state.json``) and the sha256 of its data files (so two datasets saved under one
    path differ). Never raises (``error`` instead)."""
    try:
        s = hf_spec(spec)
    except DataError as e:
        return {"kind": "hub", "path": None, "sha256": None, "error": str(e)}
    out: dict[str, Any] = {"hf": s._asdict(), "kind": "hub", "path": None, "sha256": None}
    path = Path(s.name).expanduser()
    if not path.is_dir():
        return out
    out.update(kind="local", path=str(path.resolve()))
    state = path / s.split / "state.json" if (path / "dataset_dict.json").is_file() else path / "state.json"
    try:
        meta = json.loads(state.read_text(encoding="utf-8"))
        files = [state.parent / f["filename"] for f in meta.get("_data_files", [])]
        digest = hashlib.sha256()
        for f in files:
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
        out.update(fingerprint=meta.get("_fingerprint"), sha256=digest.hexdigest() if files else None)
    except (OSError, ValueError, KeyError, TypeError):
        pass                                   # a folder of data files, not save_to_disk: path only
    return out
