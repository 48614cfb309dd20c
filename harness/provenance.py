"""Provenance of a run: what exactly ran, so that a result can be traced and two runs compared like for like.

Small functions of plain values (paths, names, dicts), each testable alone, and one entry point,
:func:`collect`, that reads them off a pytest session's :class:`~harness.session.HarnessSession` without loading
anything new (no model load at the end of a run: what the session never loaded is resolved from files, or left
out). The result is the run JSON's ``provenance`` (docs/run-json.md):

* ``harness``: package version, git commit of the harness source tree and whether it had uncommitted changes;
* ``editors``: per editor, the resolved hyper-parameters, the YAML files they came from (with sha256), the
  ``--hparam`` overrides and how the edited layer(s) were chosen (``layers``: family file, depth rule, override);
* ``architecture``: the edited modules and how they were found (adapter table, structure, ``--arch-override``);
* ``dataset``: the spec asked for, its kind, the file resolved (with sha256), number and ids of the cases and their
  content digest (``content_sha256``);
* ``corpora``: the perplexity and key-statistics texts: spec, file, sha256, texts and tokens actually used, and the
  digest of the content used (``content_sha256``).

The dataset and corpora sections are the records the session's resolvers returned as they loaded
(``HarnessSession.resolved``, ``harness.data.resolved``), recorded as they are: nothing is resolved a second time.
* ``seeds``: every seed that shapes the numbers.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import os
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .data.resolved import corpus_file, dataset_file, sha256_file  # noqa: F401  (re-exported)

PACKAGE = "knowedit-harness"
SOURCE_ROOT = Path(__file__).resolve().parents[1]


def file_entry(path: Path, root: Path | None = None) -> dict[str, Any]:
    """``{"path", "sha256"}``, the path relative to ``root`` when it lies inside it."""
    shown = path
    if root is not None:
        try:
            shown = path.resolve().relative_to(root.resolve())
        except ValueError:
            pass
    return {"path": str(shown), "sha256": sha256_file(path)}


def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def git_state(root: Path = SOURCE_ROOT) -> dict[str, Any]:
    """Commit of the git tree holding ``root`` and whether tracked files differ from it (None: not a git tree,
    e.g. an installed wheel, or no git)."""
    commit = _git(root, "rev-parse", "HEAD")
    if commit is None:
        return {"git_commit": None, "git_dirty": None}
    status = _git(root, "status", "--porcelain", "--untracked-files=no")
    return {"git_commit": commit.strip(), "git_dirty": None if status is None else bool(status.strip())}


def harness_version() -> str | None:
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None


def harness_provenance(root: Path = SOURCE_ROOT) -> dict[str, Any]:
    return {"version": harness_version(), **git_state(root), "source": str(root)}


# --------------------------------------------------------------------------- editors
def hparam_files(editor: str, family: str | None, hparams_dir: Path) -> list[Path]:
    """The YAML files ``load_hparams`` reads for ``editor`` on ``family``, in the order applied."""
    folder = hparams_dir / editor
    names = ["default.yaml"] + ([f"{family}.yaml"] if family and family != "default" else [])
    return [folder / n for n in names if (folder / n).is_file()]


def hparams_dict(hparams: Any) -> dict[str, Any] | None:
    """A hyper-parameter object (dataclass or mapping) as a plain dict."""
    if dataclasses.is_dataclass(hparams) and not isinstance(hparams, type):
        return dataclasses.asdict(hparams)
    if isinstance(hparams, dict):
        return dict(hparams)
    return None


def editor_provenance(editor: str, hparams: Any, family: str | None, overrides: dict[str, Any],
                      hparams_dir: Path) -> dict[str, Any]:
    """Resolved hyper-parameters of one editor, the files they came from and the command-line overrides."""
    return {"hparams": hparams_dict(hparams), "family": family, "overrides": dict(overrides),
            "files": [file_entry(p, hparams_dir.parent) for p in hparam_files(editor, family, hparams_dir)]}


def editor_code(cls: type) -> dict[str, Any]:
    """The code identity of an editor class: for an editor loaded from an installed package's ``harness.editors``
    entry point, the package and its version (and the entry point); always the sha256 of the source files of the
    class and of the editor classes it derives from (``files``; relative to the harness when inside it) and one
    ``sha256`` over them, so that a change to an editor's code is seen by a comparison."""
    import inspect

    from .editors.base import Editor
    from .editors.base import registry as editors

    out: dict[str, Any] = {}
    ep = editors.entry_point(getattr(cls, "name", ""))
    if ep is not None and ep.value.split(":")[0] == cls.__module__:
        dist = getattr(ep, "dist", None)
        out.update({"package": getattr(dist, "name", None), "version": getattr(dist, "version", None),
                    "entry_point": f"{ep.name} = {ep.value}"})
    files: list[dict[str, Any]] = []
    for klass in cls.__mro__:
        if klass is Editor or not (isinstance(klass, type) and issubclass(klass, Editor)):
            continue
        try:
            path = Path(inspect.getfile(klass))
        except (TypeError, OSError):
            continue
        entry = file_entry(path, SOURCE_ROOT)
        if entry not in files:
            files.append(entry)
    out["files"] = files
    joined = "".join(f"{f['path']}:{f['sha256']}" for f in files)
    out["sha256"] = hashlib.sha256(joined.encode()).hexdigest() if files else None
    return out


def resolve_editor(editor: str, overrides: Sequence[str], family: str | None, n_layers: int | None,
                   built: Any = None, hparams_file: Any = None) -> dict[str, Any]:
    """Provenance of ``editor``: from the instance the session built (``built``), else resolved from the files
    the way ``build_editor`` does, without a model. A failure is recorded, not raised (the run is over)."""
    from .editors.base import HPARAMS_DIR, hparams_files, layer_choice, load_hparams, parse_hparam_overrides
    from .editors.base import registry as editors

    cls = None
    try:
        cls = type(built) if built is not None else editors.get(editor)
        parsed = parse_hparam_overrides(list(overrides), cls)
        if built is not None:
            hp = built.hparams
        elif hparams_file is not None:           # --hparams-file: as HarnessSession.new_editor builds it
            hp = _mapped(hparams_file, cls, n_layers).build(cls, family or "default", n_layers=n_layers,
                                                            overrides=parsed)
        else:
            hp = load_hparams(cls, family or "default", parsed, n_layers=n_layers)
        out = editor_provenance(editor, hp, family, parsed, HPARAMS_DIR)
        if hparams_file is not None:             # what the EasyEdit file became, and the file itself
            out["hparams_file"] = {**hparams_file.record(), "sha256": sha256_file(hparams_file.path)}
        # the files load_hparams read (the editor's hparams folder, a FAMILY_FALLBACK family's file)
        out["files"] = [file_entry(p, HPARAMS_DIR.parent) for p in hparams_files(cls, family or "default")]
        out["class"] = f"{cls.__module__}:{cls.__qualname__}"
        out["code"] = editor_code(cls)
        if layer_choice(hp) is not None:             # how the layer(s) were chosen: file, depth rule or override
            out["layers"] = layer_choice(hp)
        return out
    except Exception as e:  # noqa: BLE001 - provenance is best effort once the tests have run
        out = {"hparams": None, "files": [], "error": f"{type(e).__name__}: {e}"}
        if cls is not None:
            try:
                out["code"] = editor_code(cls)
            except Exception:  # noqa: BLE001
                pass
        return out


def _mapped(mapping: Any, cls: type, n_layers: int | None) -> Any:
    """An ``--hparams-file`` mapping read (as at start-up) for the model's depth, as the session reads it."""
    if n_layers is None:
        return mapping
    from .editors.easyedit_hparams import map_easyedit_hparams
    return map_easyedit_hparams(mapping.path, cls, n_layers=n_layers, warn=False)


# --------------------------------------------------------------------------- data
def dataset_provenance(spec: str, data_dir: str | os.PathLike[str] | None, case_ids: Iterable[str] | None,
                       requested: str | None = None) -> dict[str, Any]:
    kind, path = dataset_file(spec, data_dir)
    ids = None if case_ids is None else [str(c) for c in case_ids]
    return {"spec": spec, "requested": requested or spec, "kind": kind,
            "path": str(path) if path is not None else None, "sha256": sha256_file(path),
            "n_cases": None if ids is None else len(ids), "case_ids": ids}


# what a run asked of a corpus (its configuration), as against what one process happened to use of it (tokens
# scored, layers whose statistics it computed); with the file's sha256 where one was read, this says whether two
# runs measured with the same corpus (``harness merge``, ``harness compare``)
CORPUS_CONFIG = ("spec", "tokens_requested", "texts_requested")


def run_corpora(run: dict[str, Any]) -> dict[str, Any]:
    """A run JSON's ``provenance.corpora`` (empty when absent)."""
    prov = run.get("provenance")
    return (prov.get("corpora") or {}) if isinstance(prov, dict) else {}


def corpus_setting(corpus: Any) -> dict[str, Any]:
    """A ``provenance.corpora`` entry reduced to its configuration and its digests (the record's ``sha256`` and
    ``content_sha256``, ``harness.data.resolved.DIGEST_FIELDS``)."""
    from .data.resolved import DIGEST_FIELDS
    if not isinstance(corpus, dict):
        return {}
    return {k: corpus.get(k) for k in (*CORPUS_CONFIG, *DIGEST_FIELDS) if corpus.get(k) is not None}


def corpus_provenance(spec: str, data_dir: str | os.PathLike[str] | None, **used: Any) -> dict[str, Any]:
    """Spec, file and sha256 of a corpus, plus what was used of it (``texts=``, ``tokens=``, ...). An ``hf:`` corpus
    records name/config/split/column and, for a folder saved with datasets, its fingerprint and data files' sha256."""
    if str(spec).startswith("hf:"):
        from .data.hub import hf_provenance
        return {"spec": spec, **hf_provenance(spec), **used}
    path = corpus_file(spec, data_dir)
    return {"spec": spec, "path": str(path) if path is not None else None, "sha256": sha256_file(path), **used}


def stats_tokens_used(stats: Any) -> Any:
    """Tokens the key statistics were actually computed on, if the statistics object records it (``tokens_used``
    or ``n_tokens_used``, an int or a per-layer mapping); None otherwise."""
    prov = getattr(stats, "provenance", None)
    if isinstance(prov, dict) and "tokens_used" in prov:
        return {"min": prov["tokens_used"], **({"per_layer": prov["per_layer"]} if "per_layer" in prov else {})}
    for name in ("tokens_used", "n_tokens_used"):
        value = getattr(stats, name, None)
        if callable(value):
            value = value()
        if value is not None:
            return dict(value) if isinstance(value, dict) else value
    return None


# --------------------------------------------------------------------------- the session
def collect(session: Any, model: dict[str, Any] | None = None,
            hparams_files: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run's provenance from a ``HarnessSession`` (read-only: nothing is loaded that the run did not load).
    ``model`` is the run's model identity (family, n_layers) when the session never loaded the model itself,
    as on an xdist controller. ``hparams_files``: editor -> what its ``--hparams-file`` became (the plugin's
    start-up mapping); without it an editor the session never built is resolved without its file."""
    o = session.options
    lm = getattr(session, "_lm", None)
    identity = dict(getattr(lm, "identity", None) or model or {})
    built = getattr(session, "_editors", None) or {}
    files = hparams_files or {}
    editors = {name: resolve_editor(name, o.hparams, identity.get("family"), identity.get("n_layers"),
                                    built.get(name), files.get(name)) for name in o.editors}
    out = {"harness": harness_provenance(), "editors": editors, "dataset": _session_dataset(session),
           "corpora": _session_corpora(session), "seeds": _session_seeds(session, editors)}
    adapter = getattr(lm, "adapter", None)
    if hasattr(adapter, "describe"):                 # the edited modules and how they were found (table/structure)
        out["architecture"] = adapter.describe()
    return out


def _held(session: Any) -> dict[str, Any]:
    """What the session's resolvers resolved (``HarnessSession.resolved``: name -> ``Resolved``); {} for a session
    that keeps none."""
    try:
        held = getattr(session, "resolved", None)
    except Exception:  # noqa: BLE001 - e.g. an unreadable statistics corpus: the tests that needed it failed
        held = getattr(session, "_resolved", None)
    return held if isinstance(held, dict) else {}


def _session_dataset(session: Any) -> dict[str, Any]:
    """The dataset record the session resolved (exactly); a session that never loaded the cases (an xdist
    controller) loads them once, which records them the same way."""
    o = session.options
    try:
        if "dataset" not in _held(session):
            cases = session.cases()        # the cases, loaded as the tests load them (no model needed)
        else:
            cases = getattr(session, "_cases", None)
        resolved = _held(session).get("dataset")
        if resolved is not None:
            out = resolved.record()
        else:                              # a session without records (a stand-in): resolved from the files
            out = dataset_provenance(session.dataset_name(), o.data_dir, [c.case_id for c in cases],
                                     requested=o.dataset)
        skipped = getattr(cases, "skipped", None)
        if skipped:                        # --skip-invalid: what was left out, and why
            out["skipped"] = [s.to_dict() for s in skipped]
        return out
    except Exception as e:  # noqa: BLE001 - a dataset error has already failed the tests that needed it
        return {"spec": str(o.dataset), "kind": None, "error": f"{type(e).__name__}: {e}"}


def _session_corpora(session: Any) -> dict[str, Any]:
    """The perplexity and statistics records the session resolved (exactly), with what was used of them (tokens
    scored, layers computed). What this process never loaded is described from the files (the old path: an
    xdist controller, a shard that ran no test needing it)."""
    o = session.options
    out: dict[str, Any] = {}
    held = _held(session)
    base = getattr(session, "_ppl_base", None)
    texts = getattr(session, "_ppl_texts", None)
    try:
        if held.get("perplexity") is not None:
            out["perplexity"] = {**held["perplexity"].record(), "tokens": getattr(base, "n_tokens", None)}
        else:
            out["perplexity"] = corpus_provenance(session.ppl_corpus_name(), o.data_dir,
                                                  texts_requested=o.ppl_texts,
                                                  texts=None if texts is None else len(texts),
                                                  tokens=getattr(base, "n_tokens", None))
    except Exception as e:  # noqa: BLE001
        out["perplexity"] = {"spec": str(o.ppl_corpus), "error": f"{type(e).__name__}: {e}"}
    stats = getattr(session, "_stats", None)
    if held.get("statistics") is not None:
        out["statistics"] = {**held["statistics"].record(), "tokens_used": stats_tokens_used(stats),
                             "layers": sorted(getattr(stats, "_mem", {}) or [])}
    elif stats is not None:
        out["statistics"] = corpus_provenance(
            getattr(stats, "corpus_name", str(o.stats_corpus)), o.data_dir,
            tokens_requested=getattr(stats, "n_tokens", o.stats_tokens), tokens_used=stats_tokens_used(stats),
            layers=sorted(getattr(stats, "_mem", {}) or []))
        if out["statistics"].get("sha256") is None and hasattr(stats, "corpus_digest"):
            # model samples: the digest of what they were sampled with (their cache key), as the statistics use
            out["statistics"]["sha256"] = stats.corpus_digest()
    else:
        out["statistics"] = {"spec": str(o.stats_corpus), "used": False,
                             "tokens_requested": "auto" if o.stats_tokens is None else o.stats_tokens}
    return out


def _session_seeds(session: Any, editors: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The seeds a run used, from its configuration, not from what this process happened to build (a shard that
    ran no tracing test or never built an editor records the same seeds as one that did)."""
    import inspect

    from .metrics.registry import BOOTSTRAP_SEED
    from .tracing import CausalTracer

    tracer = getattr(session, "_tracer", None)
    default_tracing = inspect.signature(CausalTracer.__init__).parameters["seed"].default
    seeds: dict[str, Any] = {"bootstrap": BOOTSTRAP_SEED, "editing_problems_noise": 0,
                             "tracing_noise": getattr(tracer, "seed", default_tracing)}
    for name, resolved in editors.items():
        seed = (resolved.get("hparams") or {}).get("template_seed")
        if seed is not None:
            seeds[f"{name}.template_seed"] = seed
    try:
        import torch
        seeds["torch_initial_seed"] = int(torch.initial_seed())
    except Exception:  # noqa: BLE001
        pass
    return seeds
