"""The Editor interface, the edit handle it returns, hyper-parameter files and the registry.

An editor sees a loaded model (model, tokenizer, adapter), the cases and its hyper-parameters. It returns an ``Edit``
saying what it changed, so the run can undo it: a weight snapshot for editors that change weights, a callable for
editors that add something instead (a memory module hooked into a layer, like GRACE) and a prompt prefix for
in-context editors (IKE). It never reads pytest options or writes reports.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import math
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import yaml

from ..data.case import EditCase
from ..editor_aliases import ALIASES, canonical_editor
from ..models.loading import LoadedModel
from ..models.snapshot import WeightSnapshot

ENTRY_POINT_GROUP = "harness.editors"
HPARAMS_DIR = Path(__file__).parent / "hparams"
# families without files of their own read another family's: Mistral and Qwen2/3 share Llama's module layout, and
# EasyEdit's Mistral-7B and Qwen2.5-7B files for ROME and MEMIT hold the same values as its Llama-7B ones
FAMILY_FALLBACK: dict[str, str] = {"mistral": "llama", "qwen2": "llama", "qwen3": "llama"}
# families with no file (nor a fallback): each editor's layer(s) from the reference family's file at the same relative
# depth. The llama files were set on SmolLM2-135M (30 layers); their layers sit where the references put them on
# Llama-7B (ROME 5 of 32, MEMIT 4-8 of 32, GRACE 27 of 32, FT-L 21 of 32). docs/models.md
DEPTH_REFERENCE: tuple[str, int] = ("llama", 30)
DEPTH_RULE = ("l = round(l_ref * (n - 1) / (N_ref - 1)): each layer l_ref of the reference file (counted from the end "
              "when negative) at the same relative depth of the n-layer model; a list maps each layer, repeats dropped")


@dataclass(frozen=True)
class Capabilities:
    """What an editor needs and does, declared once per class (``Editor.capabilities``) and read by the session and
    the protocols (never found by probing attributes). Whatever it declares, the harness checks the whole model after
    every restore (``harness.editing.guarded``).

    - ``needs_key_stats``: it reads ``self.stats`` (second moments of keys, ``harness.stats.LayerStats``); the
      session builds them only for editors that need them.
    - ``changes``: ``"weights"`` (``edited_parameters`` snapshotted by ``Editor.apply``, digest-checked after the
      restore), ``"hooks"`` (modules or hooks added, taken away by ``Edit.undo``) or ``"prompt_prefix"`` (an
      in-context edit: ``Edit.prompt_prefix``).
    - ``batches``: one ``apply`` may take several cases (``--batch-size``).
    - ``values_ahead``: it holds a ``ValuesAhead`` as ``self.ahead`` and may optimise the v* of the next single edits
      together (``--vstar-batch``, ``harness.editors.common.AheadPlan``)."""

    needs_key_stats: bool = False
    changes: str = "weights"
    batches: bool = False
    values_ahead: bool = False

    CHANGES: ClassVar[tuple[str, ...]] = ("weights", "hooks", "prompt_prefix")

    def __post_init__(self) -> None:
        if self.changes not in self.CHANGES:
            raise ValueError(f"Capabilities.changes={self.changes!r}: one of {', '.join(self.CHANGES)}")


class BrokenEntryPointWarning(UserWarning):
    """An installed package's ``harness.editors`` entry point could not be loaded; the other editors still run."""


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
    capabilities: ClassVar[Capabilities] = Capabilities()
    supports_batch: ClassVar[bool] = False      # = capabilities.batches (kept in step by __init_subclass__)
    hparams_dir: ClassVar[str | Path | None] = None   # a package's own hparams folder (docs/writing-an-editor.md)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A subclass that still sets ``supports_batch`` (the older spelling) without declaring ``capabilities``
        gets ``batches`` from it; ``supports_batch`` always reads the declared value."""
        super().__init_subclass__(**kwargs)
        if "capabilities" not in cls.__dict__ and "supports_batch" in cls.__dict__:
            cls.capabilities = dataclasses.replace(cls.capabilities, batches=bool(cls.__dict__["supports_batch"]))
        cls.supports_batch = cls.capabilities.batches

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
        if len(cases) > 1 and not self.capabilities.batches:
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


def hparams_folder(editor_cls: type[Editor]) -> Path:
    """Where ``editor_cls``'s hyper-parameter files live: its ``hparams_dir`` class attribute (relative to its
    module's folder), else ``hparams/<name>/`` next to its module when that folder exists (a package shipping its
    own per-model files: ``default.yaml`` and ``<family>.yaml``), else the harness's ``harness/editors/hparams/<name>``
    (``hparams_name`` when set)."""
    import inspect
    name = getattr(editor_cls, "hparams_name", editor_cls.name)
    try:
        home = Path(inspect.getfile(editor_cls)).resolve().parent
    except (TypeError, OSError):
        home = None
    declared = getattr(editor_cls, "hparams_dir", None)
    if declared is not None:
        p = Path(declared).expanduser()
        return p if p.is_absolute() or home is None else home / p
    if home is not None and home != HPARAMS_DIR.parent.resolve() and (home / "hparams" / name).is_dir():
        return home / "hparams" / name
    return HPARAMS_DIR / name


def family_file(editor_cls: type[Editor], family: str) -> Path | None:
    """The family's own file for ``editor_cls``, else that of the family it falls back to (``FAMILY_FALLBACK``)."""
    folder = hparams_folder(editor_cls)
    for name in (family, FAMILY_FALLBACK.get(family)):
        if name and (folder / f"{name}.yaml").is_file():
            return folder / f"{name}.yaml"
    return None


def hparams_files(editor_cls: type[Editor], family: str) -> list[Path]:
    """The files that set ``editor_cls``'s hyper-parameters on ``family``, in order: ``default.yaml`` (third-party
    editors may keep their defaults there; the built-in ones keep them in their dataclass) and the family's file
    (or that of the family it falls back to, ``FAMILY_FALLBACK``)."""
    default = hparams_folder(editor_cls) / "default.yaml"
    return [f for f in (default, family_file(editor_cls, family)) if f is not None and f.is_file()]


def _shown(path: Path) -> str:
    return str(path.relative_to(HPARAMS_DIR.parent)) if path.is_relative_to(HPARAMS_DIR.parent) else str(path)


def depth_scaled(layer: int, n_layers: int, ref_depth: int = DEPTH_REFERENCE[1]) -> int:
    """Reference layer ``layer`` of a ``ref_depth``-layer model at the same relative depth of an ``n_layers`` model."""
    absolute = layer + ref_depth if layer < 0 else layer
    return int(absolute * (n_layers - 1) / max(1, ref_depth - 1) + 0.5) if n_layers > 1 else 0


def layers_by_depth(editor_cls: type[Editor], n_layers: int) -> dict[str, tuple[Any, str]]:
    """``{field: (value, reference)}`` for the ``layer``/``layers`` fields the reference family's file
    (``DEPTH_REFERENCE``) sets, scaled to ``n_layers`` by ``DEPTH_RULE``; empty when that file does not exist."""
    ref_family, ref_depth = DEPTH_REFERENCE
    ref = family_file(editor_cls, ref_family)
    if ref is None or not dataclasses.is_dataclass(editor_cls.Hparams):
        return {}
    values = yaml.safe_load(ref.read_text()) or {}
    known = {f.name for f in dataclasses.fields(editor_cls.Hparams)}
    out: dict[str, tuple[Any, str]] = {}
    for key in ("layer", "layers"):
        v = values.get(key)
        if key not in known or v is None:
            continue
        if isinstance(v, list):
            scaled: Any = list(dict.fromkeys(depth_scaled(int(x), n_layers, ref_depth) for x in v))
        else:
            scaled = depth_scaled(int(v), n_layers, ref_depth)
        out[key] = (scaled, f"{key} {v} of {ref_depth} in {_shown(ref)}")
    return out


def layer_choice(hparams: Any) -> dict[str, Any] | None:
    """How ``load_hparams`` chose the layer(s) of ``hparams`` (recorded in the run's provenance), or None."""
    return getattr(hparams, "_layer_choice", None)


def load_hparams(editor_cls: type[Editor], family: str, overrides: dict[str, Any] | None = None,
                 n_layers: int | None = None) -> Any:
    """Hyper-parameters for ``editor_cls`` on a model family: the dataclass defaults, then ``hparams_files`` (only
    what differs), then ``overrides`` (from ``--hparam``). Values are type-checked against the dataclass; layer
    indices may be negative (from the end)."""
    values: dict[str, Any] = {}
    source: dict[str, str] = {}
    for f in hparams_files(editor_cls, family):
        file_values = yaml.safe_load(f.read_text()) or {}
        values.update(file_values)
        source.update(dict.fromkeys(file_values, _shown(f)))
    derived = {}
    if n_layers is not None and family_file(editor_cls, family) is None:    # no family file: layers by depth
        derived = {k: v for k, v in layers_by_depth(editor_cls, n_layers).items() if k not in values}
        for k, (v, _) in derived.items():
            values[k], source[k] = v, "depth rule"
    for k, v in (overrides or {}).items():
        values[k], source[k] = _coerce(v), "override (--hparam or --hparams-file)"
    if editor_cls.Hparams is dict:
        return values
    known = {f.name for f in dataclasses.fields(editor_cls.Hparams)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise HparamsError(f"editor {editor_cls.name!r} has no hyper-parameter {unknown[0]!r}; "
                           f"known: {', '.join(sorted(known))}")
    hints = typing.get_type_hints(editor_cls.Hparams)
    by_name = {f.name: f for f in dataclasses.fields(editor_cls.Hparams)}
    values = {k: _checked(editor_cls.name, k, v, hints.get(k, Any), by_name[k]) for k, v in values.items()}
    hp = editor_cls.Hparams(**values)
    if n_layers is not None:
        for f in ("layer", "layers"):
            if hasattr(hp, f):
                v = getattr(hp, f)
                setattr(hp, f, [_layer_index(x, n_layers, editor_cls.name, f) for x in v]
                        if isinstance(v, (list, tuple)) else _layer_index(v, n_layers, editor_cls.name, f))
    _record_layers(hp, family, n_layers, source, derived)
    return hp


def _record_layers(hp: Any, family: str, n_layers: int | None, source: dict[str, str],
                   derived: dict[str, tuple[Any, str]]) -> None:
    """Keep on ``hp`` where its layer fields came from (``layer_choice``): a family file, the depth rule (with the
    reference and the rule), an override, or the dataclass default."""
    choice: dict[str, Any] = {"family": family, "n_layers": n_layers}
    for f in ("layer", "layers"):
        if hasattr(hp, f):
            entry = {"value": getattr(hp, f), "source": source.get(f, "dataclass default")}
            if entry["source"] == "depth rule":
                entry["reference"] = derived[f][1]
            choice[f] = entry
    if len(choice) == 2:
        return
    if any(isinstance(e, dict) and e["source"] == "depth rule" for e in choice.values()):
        choice["rule"] = DEPTH_RULE
    try:
        object.__setattr__(hp, "_layer_choice", choice)
    except (AttributeError, TypeError):      # an Hparams class with __slots__: not recorded
        pass


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


def _checked(editor: str, key: str, value: Any, typ: Any, spec: dataclasses.Field | None = None) -> Any:
    """``value`` for hyper-parameter ``key`` if it fits its type (an int where a float is expected becomes a float)
    and the constraints its field declares (``CONSTRAINTS``), else an ``HparamsError`` naming the editor, the key,
    the value and what is accepted."""
    if not _accepts(value, typ):
        raise HparamsError(f"editor {editor!r}: hyper-parameter {key}={value!r} is not a valid {_type_name(typ)}; "
                           f"pass e.g. --hparam {editor}.{key}=<{_type_name(typ)}>")
    if key in ("layer", "layers") and isinstance(value, (list, tuple)) and not all(
            isinstance(x, int) and not isinstance(x, bool) for x in value):
        raise HparamsError(f"editor {editor!r}: hyper-parameter {key}={value!r} is not a list of layer indices "
                           f"(integers); pass e.g. --hparam {editor}.{key}=[3,4]")
    problem = _constraint_problem(value, spec.metadata if spec is not None else {})
    if problem:
        default = spec.default if spec is not None else None
        example = "=<value>" if default in (None, dataclasses.MISSING) else f"={default}"
        raise HparamsError(f"editor {editor!r}: hyper-parameter {key}={value!r} {problem}; "
                           f"pass e.g. --hparam {editor}.{key}{example}")
    return float(value) if typ is float else value


# Constraints a hyper-parameter's dataclass field may declare in its ``metadata``, e.g.
# ``v_num_grad_steps: int = field(default=20, metadata={"min": 1})``: ``min`` / ``max`` (inclusive bounds), ``gt`` /
# ``lt`` (exclusive bounds), ``choices`` (the accepted values) and ``allow_inf`` (a float may be infinite). Every
# float value must be a number: NaN is never accepted, infinity only with ``allow_inf``. ``None`` (a field typed
# ``X | None``) passes. Checked wherever a value is set: family files, ``--hparams-file``, and ``--hparam`` at
# start-up (``validate_overrides``).
CONSTRAINTS = ("min", "max", "gt", "lt", "choices", "allow_inf")


def _constraint_problem(value: Any, meta: Any) -> str | None:
    """What ``value`` breaks of the constraints in a field's ``meta`` (``CONSTRAINTS``), or None."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        if math.isnan(value):
            return "is not a number (NaN)"
        if not meta.get("allow_inf"):
            return "is not finite"
    if "choices" in meta and value not in meta["choices"]:
        return f"is not one of {', '.join(map(str, meta['choices']))}"
    if isinstance(value, (int, float)):
        for name, ok, words in (("min", lambda b: value >= b, ">="), ("gt", lambda b: value > b, ">"),
                                ("max", lambda b: value <= b, "<="), ("lt", lambda b: value < b, "<")):
            if name in meta and not ok(meta[name]):
                return f"must be {words} {meta[name]}"
    return None


def _layer_index(layer: int, n_layers: int, editor: str, key: str = "layer") -> int:
    if not -n_layers <= int(layer) < n_layers:
        value = "[N,...]" if key == "layers" else "N"
        raise HparamsError(f"editor {editor!r}: layer {layer} does not exist in a {n_layers}-layer model; "
                           f"pass --hparam {editor}.{key}={value} with 0 <= N < {n_layers}")
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
            if canonical_editor(ed) == canonical_editor(editor_cls.name):     # an alias names the same editor
                out[key] = value            # unknown keys are reported by load_hparams
        elif fields is None or key in fields:
            out[key] = value
    return out


def _split_override(item: str) -> tuple[str, str]:
    if "=" not in item:
        raise HparamsError(f"--hparam {item!r}: expected KEY=VALUE or EDITOR.KEY=VALUE, e.g. rome.layer=5")
    key, value = item.split("=", 1)
    return key.strip(), value.strip()


def validate_overrides(items: Sequence[str], editor_names: Sequence[str], n_layers: int | None = None) -> None:
    """Fail early (at start-up) on an override no editor would use (a typo must not pass silently) or a value its
    editor would refuse. ``EDITOR.KEY`` is checked against that editor (selected or not; an unknown ``EDITOR`` is an
    error naming the known ones); a bare ``KEY`` must belong to at least one selected editor. Each value is checked
    against the hyper-parameter's type and declared constraints (``CONSTRAINTS``) for every editor it applies to,
    and, given the model's depth ``n_layers``, ``layer``/``layers`` against the model's layers."""
    def fields(cls: type[Editor]) -> set[str]:
        return {f.name for f in dataclasses.fields(cls.Hparams)} if dataclasses.is_dataclass(cls.Hparams) else set()

    for item in items:
        key, raw = _split_override(item)
        if "." in key:
            ed, k = key.split(".", 1)
            try:
                targets = [registry.get(ed)]
            except UnknownEditorError:
                raise HparamsError(f"--hparam {item}: unknown editor {ed!r} before the '.'; known editors: "
                                   f"{', '.join(registry.names())} (or KEY=VALUE without an editor: every selected "
                                   "editor that has KEY)") from None
            cls = targets[0]
            if dataclasses.is_dataclass(cls.Hparams) and k not in fields(cls):
                raise HparamsError(f"--hparam {item}: editor {ed!r} has no hyper-parameter {k!r}; "
                                   f"known: {', '.join(sorted(fields(cls)))}")
        else:
            k = key
            targets = [registry.get(n) for n in editor_names if key in fields(registry.get(n))]
            if not targets:
                raise HparamsError(f"--hparam {item}: no selected editor has a hyper-parameter {key!r}")
        for cls in targets:
            if dataclasses.is_dataclass(cls.Hparams):
                try:
                    check_override(cls, k, raw, n_layers)
                except HparamsError as e:
                    raise HparamsError(f"--hparam {item}: {e}") from None


def check_override(editor_cls: type[Editor], key: str, raw: Any, n_layers: int | None = None) -> Any:
    """One ``--hparam`` value for ``editor_cls``'s hyper-parameter ``key`` as ``load_hparams`` will take it: type,
    declared constraints and (given ``n_layers``) the layer range; returns the value, or raises ``HparamsError``."""
    spec = {f.name: f for f in dataclasses.fields(editor_cls.Hparams)}[key]
    value = _checked(editor_cls.name, key, _coerce(raw), typing.get_type_hints(editor_cls.Hparams).get(key, Any),
                     spec)
    if n_layers is not None and key in ("layer", "layers") and value is not None:
        for x in value if isinstance(value, (list, tuple)) else [value]:
            _layer_index(x, n_layers, editor_cls.name, key)
    return value


# --- registry --------------------------------------------------------------------------------------------
class EditorRegistry:
    """Names -> editor classes: the built-in ones plus those third parties declare in the
    ``harness.editors`` entry-point group (``name = "package.module:EditorClass"``)."""

    def __init__(self) -> None:
        self._classes: dict[str, type[Editor]] = {}
        self._entry_points_loaded = False
        self._entry_points: dict[str, Any] = {}        # name -> the EntryPoint it was loaded from
        self.broken: dict[str, str] = {}                 # entry point name -> why it could not be loaded

    def entry_point(self, name: str) -> Any:
        """The ``importlib.metadata.EntryPoint`` editor ``name`` was loaded from (None: registered in code)."""
        self._load_entry_points()
        return self._entry_points.get(canonical_editor(name))

    def register(self, cls: type[Editor]) -> type[Editor]:
        self._classes[cls.name] = cls
        return cls

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        import warnings
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if ep.name in self._classes:
                continue
            try:
                cls = ep.load()
                if not (isinstance(cls, type) and issubclass(cls, Editor)):
                    raise TypeError(f"{ep.value} is not an Editor subclass")
            except Exception as e:  # noqa: BLE001 - one broken package must not stop the other editors
                dist = getattr(getattr(ep, "dist", None), "name", None)
                first = (str(e).strip().splitlines() or [""])[0]
                self.broken[ep.name] = f"{type(e).__name__}: {first}"
                warnings.warn(f"editor entry point {ep.name!r} = {ep.value!r}"
                              f"{f' (package {dist})' if dist else ''} could not be loaded and is left out: "
                              f"{type(e).__name__}: {first}", BrokenEntryPointWarning, stacklevel=2)
                continue
            self._classes[ep.name] = cls
            self._entry_points[ep.name] = ep

    def names(self) -> list[str]:
        """Every name ``get`` accepts: the registered editors and the aliases of registered ones."""
        self._load_entry_points()
        return sorted(set(self._classes) | {a for a, n in ALIASES.items() if n in self._classes})

    def canonical(self, name: str) -> str:
        """The registered name an alias stands for (``ft`` -> ``ft_l``); other names unchanged."""
        return canonical_editor(name)

    def get(self, name: str) -> type[Editor]:
        self._load_entry_points()
        try:
            return self._classes[canonical_editor(name)]
        except KeyError:
            if canonical_editor(name) in self.broken:
                raise UnknownEditorError(f"editor {name!r}: its entry point could not be loaded "
                                         f"({self.broken[canonical_editor(name)]})") from None
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
