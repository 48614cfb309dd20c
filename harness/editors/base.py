"""The Editor interface, the edit handle it returns, hyper-parameter files and the registry.

An editor sees a loaded model (model, tokenizer, adapter), the cases and its hyper-parameters. It returns an ``Edit``
saying what it changed, so the run can undo it: a weight snapshot for editors that change weights, a callable for
editors that add something instead (a memory module hooked into a layer, like GRACE) and a prompt prefix for
in-context editors (IKE). It never reads pytest options or writes reports.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import yaml

from ..data.case import EditCase
from ..models.loading import LoadedModel
from ..models.snapshot import WeightSnapshot

ENTRY_POINT_GROUP = "harness.editors"
HPARAMS_DIR = Path(__file__).parent / "hparams"
# families without files of their own read another family's: Mistral and Qwen2/3 share Llama's module layout, and
# EasyEdit's Mistral-7B and Qwen2.5-7B files for ROME and MEMIT hold the same values as its Llama-7B ones
FAMILY_FALLBACK: dict[str, str] = {"mistral": "llama", "qwen2": "llama", "qwen3": "llama"}


class UnknownEditorError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; a usage error should read plainly
        return str(self.args[0])


class HparamsError(ValueError):
    pass


@dataclass
class Edit:
    """What one ``Editor.apply`` call changed, and how to take it back."""

    editor: str
    case_ids: list[str]
    snapshot: WeightSnapshot | None = None          # weights as they were before this edit
    undo: Callable[[], None] | None = None          # for editors that add hooks/modules instead
    prompt_prefix: str = ""                         # for in-context editors: prepended to every scored prompt
    info: dict[str, Any] = field(default_factory=dict)  # diagnostics (losses, norms), JSON-serialisable
    seconds: float = 0.0

    @property
    def changed_parameters(self) -> list[str]:
        return self.snapshot.names if self.snapshot else []

    def restore(self) -> None:
        """Undo this edit (bit-exact for weights). Undo several edits in reverse order."""
        if self.snapshot is not None:
            self.snapshot.restore()
        if self.undo is not None:
            self.undo()


class Editor:
    """Base class. Subclasses set ``name``, ``Hparams`` (a dataclass) and implement ``edited_parameters`` and
    ``execute``; editors that do not change weights override ``apply`` instead.

    State that lives across edits (accumulated keys, running sums, cached context templates) is held by the
    instance and cleared by ``reset()``; the run calls ``reset()`` whenever it restores the model.
    """

    name: ClassVar[str] = "base"
    Hparams: ClassVar[type] = dict
    supports_batch: ClassVar[bool] = False

    def __init__(self, hparams: Any, *, stats: Any = None):
        self.hparams = hparams
        self.stats = stats  # a harness.stats.LayerStats (second moments of keys), or None

    # --- to implement ----------------------------------------------------------------------------------
    def edited_parameters(self, lm: LoadedModel) -> list[str]:
        raise NotImplementedError

    def execute(self, lm: LoadedModel, cases: Sequence[EditCase]) -> dict[str, Any]:
        """Change the model in place; return diagnostics."""
        raise NotImplementedError

    # --- provided ------------------------------------------------------------------------------------
    def apply(self, lm: LoadedModel, cases: Sequence[EditCase]) -> Edit:
        if len(cases) > 1 and not self.supports_batch:
            raise ValueError(f"editor {self.name!r} edits one case at a time; use --batch-size 1")
        snapshot = WeightSnapshot(lm.model, self.edited_parameters(lm))
        t0 = time.perf_counter()
        try:
            info = self.execute(lm, cases) or {}
        except BaseException:
            snapshot.restore()   # a failed edit leaves no trace in the model
            raise
        return Edit(self.name, [c.case_id for c in cases], snapshot=snapshot, info=info,
                    seconds=time.perf_counter() - t0)

    def prepare(self, lm: LoadedModel) -> None:
        """Work that must see the unedited model (e.g. generating context templates); called before the first
        edit and before a sequential run replays a checkpoint. Idempotent."""

    def reset(self) -> None:
        """Forget state accumulated across edits (called when the model is restored)."""

    def state(self) -> dict[str, Any]:
        """State accumulated across edits, as tensors/plain values (saved with a sequential run's checkpoint)."""
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore what ``state()`` returned (resuming a sequential run)."""

    def describe(self) -> dict[str, Any]:
        hp = dataclasses.asdict(self.hparams) if dataclasses.is_dataclass(self.hparams) else dict(self.hparams)
        return {"editor": self.name, "hparams": hp}


# --- hyper-parameters ----------------------------------------------------------------------------------
def _coerce(value: Any) -> Any:
    """A command-line value as YAML (lists, booleans, numbers); "1e-3" is a float, not YAML 1.1's string."""
    if not isinstance(value, str):
        return value
    parsed = yaml.safe_load(value)
    if isinstance(parsed, str):
        try:
            return float(parsed)
        except ValueError:
            return parsed
    return parsed


def hparams_files(editor_cls: type[Editor], family: str) -> list[Path]:
    """The files that set ``editor_cls``'s hyper-parameters on ``family``, in order: ``default.yaml`` (third-party
    editors may keep their defaults there; the built-in ones keep them in their dataclass) and the family's file
    (or that of the family it falls back to, ``FAMILY_FALLBACK``)."""
    folder = HPARAMS_DIR / getattr(editor_cls, "hparams_name", editor_cls.name)
    family_file = folder / f"{family}.yaml"
    if not family_file.exists() and family in FAMILY_FALLBACK:
        family_file = folder / f"{FAMILY_FALLBACK[family]}.yaml"
    return [f for f in (folder / "default.yaml", family_file) if f.exists()]


def load_hparams(editor_cls: type[Editor], family: str, overrides: dict[str, Any] | None = None,
                 n_layers: int | None = None) -> Any:
    """Hyper-parameters for ``editor_cls`` on a model family: the dataclass defaults, then ``hparams_files`` (only
    what differs), then ``overrides`` (from ``--hparam``). Values are type-checked against the dataclass; layer
    indices may be negative (from the end)."""
    values: dict[str, Any] = {}
    for f in hparams_files(editor_cls, family):
        values.update(yaml.safe_load(f.read_text()) or {})
    for k, v in (overrides or {}).items():
        values[k] = _coerce(v)
    if editor_cls.Hparams is dict:
        return values
    known = {f.name for f in dataclasses.fields(editor_cls.Hparams)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise HparamsError(f"editor {editor_cls.name!r} has no hyper-parameter {unknown[0]!r}; "
                           f"known: {', '.join(sorted(known))}")
    hints = typing.get_type_hints(editor_cls.Hparams)
    values = {k: _checked(editor_cls.name, k, v, hints.get(k, Any)) for k, v in values.items()}
    hp = editor_cls.Hparams(**values)
    if n_layers is not None:
        for f in ("layer", "layers"):
            if hasattr(hp, f):
                v = getattr(hp, f)
                setattr(hp, f, [_layer_index(x, n_layers, editor_cls.name) for x in v]
                        if isinstance(v, (list, tuple)) else _layer_index(v, n_layers, editor_cls.name))
    return hp


def _accepts(value: Any, typ: Any) -> bool:
    """Whether ``value`` (as YAML parsed it) fits the annotation ``typ`` (int, float, bool, str, list, X | None)."""
    origin = typing.get_origin(typ)
    if typ is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(value, t) for t in typing.get_args(typ))
    if typ is type(None):
        return value is None
    if typ is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if typ is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, origin or typ)


def _type_name(typ: Any) -> str:
    if typing.get_origin(typ) in (typing.Union, types.UnionType):
        return " or ".join("null" if t is type(None) else _type_name(t) for t in typing.get_args(typ))
    return getattr(typing.get_origin(typ) or typ, "__name__", str(typ))


def _checked(editor: str, key: str, value: Any, typ: Any) -> Any:
    """``value`` for hyper-parameter ``key`` if it fits its type (an int where a float is expected becomes a float),
    else an ``HparamsError`` naming the editor, the key, the value and the expected type."""
    if not _accepts(value, typ):
        raise HparamsError(f"editor {editor!r}: hyper-parameter {key}={value!r} is not a valid {_type_name(typ)}; "
                           f"pass e.g. --hparam {editor}.{key}=<{_type_name(typ)}>")
    return float(value) if typ is float else value


def _layer_index(layer: int, n_layers: int, editor: str) -> int:
    if not -n_layers <= int(layer) < n_layers:
        raise HparamsError(f"editor {editor!r}: layer {layer} does not exist in a {n_layers}-layer model; "
                           f"pass --hparam {editor}.layer=N with 0 <= N < {n_layers}")
    return int(layer) % n_layers


def parse_hparam_overrides(items: Sequence[str], editor_cls: type[Editor]) -> dict[str, str]:
    """``--hparam EDITOR.KEY=VALUE`` (one editor) or ``--hparam KEY=VALUE`` (every editor that has KEY)."""
    fields = ({f.name for f in dataclasses.fields(editor_cls.Hparams)}
              if dataclasses.is_dataclass(editor_cls.Hparams) else None)
    out: dict[str, str] = {}
    for item in items:
        key, value = _split_override(item)
        if "." in key:
            ed, key = key.split(".", 1)
            if ed == editor_cls.name:
                out[key] = value            # unknown keys are reported by load_hparams
        elif fields is None or key in fields:
            out[key] = value
    return out


def _split_override(item: str) -> tuple[str, str]:
    if "=" not in item:
        raise HparamsError(f"--hparam {item!r}: expected KEY=VALUE or EDITOR.KEY=VALUE, e.g. rome.layer=5")
    key, value = item.split("=", 1)
    return key.strip(), value.strip()


def validate_overrides(items: Sequence[str], editor_names: Sequence[str]) -> None:
    """Fail early on an override no editor would use (a typo must not pass silently). ``EDITOR.KEY`` is checked
    against that editor (selected or not); a bare ``KEY`` must belong to at least one selected editor."""
    def fields(cls: type[Editor]) -> set[str]:
        return {f.name for f in dataclasses.fields(cls.Hparams)} if dataclasses.is_dataclass(cls.Hparams) else set()

    for item in items:
        key, _ = _split_override(item)
        if "." in key:
            ed, k = key.split(".", 1)
            cls = registry.get(ed)
            if dataclasses.is_dataclass(cls.Hparams) and k not in fields(cls):
                raise HparamsError(f"--hparam {item}: editor {ed!r} has no hyper-parameter {k!r}; "
                                   f"known: {', '.join(sorted(fields(cls)))}")
        elif not any(key in fields(registry.get(n)) for n in editor_names):
            raise HparamsError(f"--hparam {item}: no selected editor has a hyper-parameter {key!r}")


# --- registry --------------------------------------------------------------------------------------------
class EditorRegistry:
    """Names -> editor classes: the built-in ones plus those third parties declare in the
    ``harness.editors`` entry-point group (``name = "package.module:EditorClass"``)."""

    def __init__(self) -> None:
        self._classes: dict[str, type[Editor]] = {}
        self._entry_points_loaded = False

    def register(self, cls: type[Editor]) -> type[Editor]:
        self._classes[cls.name] = cls
        return cls

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if ep.name not in self._classes:
                self._classes[ep.name] = ep.load()

    def names(self) -> list[str]:
        self._load_entry_points()
        return sorted(self._classes)

    def get(self, name: str) -> type[Editor]:
        self._load_entry_points()
        try:
            return self._classes[name]
        except KeyError:
            raise UnknownEditorError(
                f"unknown editor {name!r}; available: {', '.join(self.names())} "
                f"(third-party editors register in the {ENTRY_POINT_GROUP!r} entry-point group)") from None


registry = EditorRegistry()
register_editor = registry.register


def build_editor(name: str, lm: LoadedModel, overrides: Sequence[str] = (), stats: Any = None) -> Editor:
    """The editor ``name`` with its hyper-parameters for ``lm``'s family and the command-line overrides."""
    cls = registry.get(name)
    hp = load_hparams(cls, lm.adapter.family, parse_hparam_overrides(overrides, cls), n_layers=lm.n_layers)
    return cls(hp, stats=stats)
