"""The edit lifecycle, one context manager for every protocol: apply the editor, hand the edit to the block,
restore the model and reset the editor's accumulated state, then check the whole model (``guarded``): a restore
that leaves a trace would leak one test's edit into the next test's scores, and into another editor's.

The editor declares (``Editor.capabilities``), the harness guards: whatever an editor declares, after every restore
every parameter and buffer of the model is checked (version counters and storage first, which any in-place write
bumps; a SHA-256 digest of the declared parameters, of the tensors a counter says were written, and of every tensor
for a weight editor that declares no parameters), and every module's forward / pre-forward hooks, children,
parameters and buffers are compared with what they were before. Whatever is left over is put back (hooks removed,
modules and tensors re-seated, values copied back from the model's pristine source: the session reloads the model
from its files) and reported as one :class:`RestoreError` naming each tensor and hook, so the next test is measured
on the unedited model."""
from __future__ import annotations

import contextlib
import hashlib
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .data.case import EditCase
from .editors.base import Edit, Editor
from .editors.common import AheadPlan
from .models.loading import LoadedModel
from .timing import PhaseTimer


class RestoreError(RuntimeError):
    """The model differs after an edit was undone (a written tensor, a hook or module left behind); the harness has
    put it back before raising."""


# model -> a callable giving the pristine values of named tensors (``register_source``)
_SOURCES: "weakref.WeakKeyDictionary[nn.Module, Callable[[Sequence[str]], dict[str, torch.Tensor]]]" = \
    weakref.WeakKeyDictionary()
_VIOLATIONS: "weakref.WeakKeyDictionary[nn.Module, int]" = weakref.WeakKeyDictionary()
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def register_source(model: nn.Module, source: Callable[[Sequence[str]], dict[str, torch.Tensor]]) -> None:
    """Where the guard reads the pristine values of ``model``'s tensors (parameter and buffer names -> tensors) to
    put back a tensor an editor left written: the session reloads the model from its files. Without a source the
    guard keeps a CPU copy of the model as it was at the first guarded edit."""
    _SOURCES[model] = source


def violations(model: nn.Module) -> int:
    """How many guarded edits of ``model`` left something behind (caches built on the model may be stale)."""
    return _VIOLATIONS.get(model, 0)


def _pristine(model: nn.Module, names: Sequence[str]) -> dict[str, torch.Tensor]:
    source = _SOURCES.get(model)
    return source(names) if source is not None else {}


def _keep_copy(model: nn.Module) -> None:
    """Without a registered source: a CPU copy of every tensor, once, at the first guarded edit."""
    if model in _SOURCES:
        return
    saved = {n: t.detach().to("cpu", copy=True) for n, t in _named_tensors(model).items()}
    _SOURCES[model] = lambda names: {n: saved[n] for n in names if n in saved}


def _named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_buffers()), **dict(model.named_parameters())}


def tensor_digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def declared_parameters(lm: LoadedModel, editor: Editor) -> list[str]:
    """The parameters ``editor`` declares it writes (``edited_parameters``), for an editor declaring
    ``changes="weights"``; none for hook and prompt-prefix editors (or an editor that cannot say)."""
    if editor.capabilities.changes != "weights":
        return []
    try:
        return list(editor.edited_parameters(lm))
    except NotImplementedError:
        return []


def checked_parameters(lm: LoadedModel, editor: Editor) -> list[str]:
    """Kept for callers of the older API: :func:`declared_parameters`."""
    return declared_parameters(lm, editor)


class ModelGuard:
    """The model as it was on entry, checked and put back on :meth:`check` (module docstring). ``declared``: the
    parameters the editor writes (digested on entry); ``full``: digest every tensor on entry (a weight editor that
    declares none, where version counters alone cannot tell a write through ``.data``)."""

    def __init__(self, model: nn.Module, declared: Sequence[str] = (), full: bool = False) -> None:
        self.model = model
        _keep_copy(model)
        self.modules = [(n, m, {d: dict(getattr(m, d)) for d in _HOOK_DICTS},
                         dict(m._modules), dict(m._parameters), dict(m._buffers)) for n, m in model.named_modules()]
        self.tensors = {n: (t, t.data_ptr(), t._version) for n, t in _named_tensors(model).items()}
        digest = self.tensors if full else [n for n in dict.fromkeys(declared) if n in self.tensors]
        self.digests = {n: tensor_digest(self.tensors[n][0]) for n in digest}
        self.full = full

    def check(self) -> list[str]:
        """What differs from the entry state (each named), after putting it back; [] when nothing does."""
        problems: list[str] = []
        for name, m, hooks, children, params, buffers in self.modules:
            where = name or type(m).__name__
            for d, before in hooks.items():
                now = getattr(m, d)
                for key in [k for k in now if k not in before]:
                    kind = d.strip("_").replace("_", " ")[:-1]
                    problems.append(f"{kind} {getattr(now[key], '__qualname__', now[key])!s} on {where}")
                    del now[key]
                    for extra in ("_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                                  "_forward_pre_hooks_with_kwargs"):
                        getattr(m, extra, {}).pop(key, None)
            for what, now, before in (("module", m._modules, children), ("parameter", m._parameters, params),
                                      ("buffer", m._buffers, buffers)):
                if now.keys() != before.keys() or any(now[k] is not v for k, v in before.items()):
                    changed = sorted(k for k in now.keys() | before.keys() if now.get(k) is not before.get(k))
                    problems += [f"{what} {name + '.' if name else ''}{k} replaced, added or removed" for k in changed]
                    now.clear()
                    now.update(before)
        written = [n for n, (t, ptr, version) in self.tensors.items()
                   if t._version != version or t.data_ptr() != ptr or n in self.digests]
        wrong = [n for n in written if n in self.digests and tensor_digest(self.tensors[n][0]) != self.digests[n]]
        unknown = [n for n in written if n not in self.digests]
        if unknown:                          # written but not digested on entry: compared with the pristine values
            pristine = _pristine(self.model, unknown)
            wrong += [n for n in unknown if n not in pristine or not _same(self.tensors[n][0], pristine[n])]
        if wrong:
            pristine = _pristine(self.model, wrong)
            with torch.no_grad():
                for n in wrong:
                    kind = "parameter" if n in dict(self.model.named_parameters()) else "buffer"
                    if n in pristine:
                        self.tensors[n][0].copy_(pristine[n].to(self.tensors[n][0].device))
                        problems.append(f"{kind} {n} written (put back)")
                    else:
                        problems.append(f"{kind} {n} written (could not be put back: no pristine copy)")
        if problems:
            _VIOLATIONS[self.model] = _VIOLATIONS.get(self.model, 0) + 1
        return problems


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    a = a.detach()
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.cpu(), b.detach().cpu())


@contextlib.contextmanager
def guarded(lm: LoadedModel, editor: Editor | None, what: str, names: Sequence[str] | None = None
            ) -> Iterator[None]:
    """On exit (also on an error), check the whole model against the entry state (:class:`ModelGuard`), put back
    whatever differs and raise one :class:`RestoreError` naming it. ``names``: the declared parameters (default:
    ``editor``'s, :func:`declared_parameters`); a weight editor that declares none has every tensor digested."""
    declared = list(names) if names is not None else (declared_parameters(lm, editor) if editor is not None else [])
    full = editor is not None and editor.capabilities.changes == "weights" and not declared
    guard = ModelGuard(lm.model, declared, full=full)
    try:
        yield
    finally:
        problems = guard.check()
        if problems:
            raise RestoreError(f"restore after {what} was not bit-exact: the model still holds a hook, a module or a "
                               f"written tensor ({'; '.join(problems)}); the harness put the model back")


@contextlib.contextmanager
def unchanged(lm: LoadedModel, names: Sequence[str], what: str, hooks: bool = False) -> Iterator[None]:
    """Kept for callers of the older API: :func:`guarded` with the declared parameters ``names``."""
    with guarded(lm, None, what, names=names):
        yield


def structure(lm: LoadedModel) -> list[tuple]:
    """Every module's name, class and number of forward (pre-)hooks, and every parameter's name, storage and version
    counter (which any in-place write bumps). Cheap: no tensor is read."""
    return ([(n, type(m).__name__, len(m._forward_hooks), len(m._forward_pre_hooks))
             for n, m in lm.model.named_modules()]
            + [(n, p.data_ptr(), p._version) for n, p in lm.model.named_parameters()])


@contextlib.contextmanager
def edited(lm: LoadedModel, editor: Editor, cases: Sequence[EditCase], timer: PhaseTimer | None = None
           ) -> Iterator[Edit]:
    """Apply ``editor`` to ``cases`` (timed as "edit") and yield the :class:`Edit`; on exit restore the model and
    reset the editor (timed as "restore"), then check the whole model (:func:`guarded`)."""
    timer = timer or PhaseTimer(lm.device)
    with guarded(lm, editor, editor.name):
        edit = None
        try:
            AheadPlan.before_edit(editor)                # nothing left over from an edit that failed
            with timer.phase("edit"):
                edit = editor.apply(lm, cases)
            AheadPlan.charge(editor, timer, edit)        # a v* batch's time shared among its cases
            yield edit
        finally:
            with timer.phase("restore"):
                if edit is not None:
                    edit.restore()
                editor.reset()
