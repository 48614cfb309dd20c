"""The edit lifecycle, one context manager for every protocol: apply the editor, hand the edit to the block,
restore the model and reset the editor's accumulated state, and check by digest that the restore was bit-exact
(a restore that leaves a trace would leak one test's edit into the next test's scores)."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

from .data.case import EditCase
from .editors.base import Edit, Editor
from .models.loading import LoadedModel
from .models.snapshot import param_digest
from .timing import PhaseTimer


class RestoreError(RuntimeError):
    """The model's weights differ after an edit was undone."""


def checked_parameters(lm: LoadedModel, editor: Editor) -> list[str]:
    """The parameters whose digest is checked around ``editor``'s edits: those it declares, for editors that edit
    weights through ``Editor.apply`` (an editor overriding ``apply`` may hook modules or edit prompts instead)."""
    return editor.edited_parameters(lm) if type(editor).apply is Editor.apply else []


def structure(lm: LoadedModel) -> list[tuple]:
    """The model as an editor that adds instead of writing must leave it: every module's name, class and number
    of forward (pre-)hooks, and every parameter's name, storage and version counter (which any in-place write
    bumps). Cheap: no tensor is read."""
    return ([(n, type(m).__name__, len(m._forward_hooks), len(m._forward_pre_hooks))
             for n, m in lm.model.named_modules()]
            + [(n, p.data_ptr(), p._version) for n, p in lm.model.named_parameters()])


@contextlib.contextmanager
def unchanged(lm: LoadedModel, names: Sequence[str], what: str, hooks: bool = False) -> Iterator[None]:
    """On exit (also on an error), raise :class:`RestoreError` if the parameters ``names`` are not bit-identical
    to what they were on entry, or (``hooks``: an editor that hooks modules, wraps them or edits prompts) if the
    model's :func:`structure` changed: a hook, adapter or write left behind. Used around a single edit and around
    a whole sequential stream."""
    before = param_digest(lm.model, list(names)) if names else None
    shape = structure(lm) if hooks else None
    try:
        yield
    finally:
        if before is not None and param_digest(lm.model, list(names)) != before:
            raise RestoreError(f"restore after {what} was not bit-exact for {list(names)}")
        if shape is not None and structure(lm) != shape:
            raise RestoreError(f"after {what} the model still holds a hook, an adapter or a written parameter")


def adds_instead_of_writing(editor: Editor) -> bool:
    """An editor that overrides ``apply`` (hooks, adapters, prompt prefixes): checked by :func:`structure`."""
    return type(editor).apply is not Editor.apply


def share_v(timer: PhaseTimer, edit: Edit, share: float, spent: float, size: int) -> None:
    """An edit whose v* came from a batch of ``size`` cases optimised together (``--vstar-batch``): its "edit" time
    counts its share of the batch's seconds, not what the batch took inside it (``spent``: all of it for the edit
    that ran the batch, none for the others), and the record says so."""
    timer.seconds["edit"] = timer.seconds.get("edit", 0.0) - spent + share
    edit.info.update(v_batch=size, v_batch_share_s=share)


@contextlib.contextmanager
def edited(lm: LoadedModel, editor: Editor, cases: Sequence[EditCase], timer: PhaseTimer | None = None
           ) -> Iterator[Edit]:
    """Apply ``editor`` to ``cases`` (timed as "edit") and yield the :class:`Edit`; on exit restore the model and
    reset the editor (timed as "restore"), then check the restore by digest."""
    timer = timer or PhaseTimer(lm.device)
    with unchanged(lm, checked_parameters(lm, editor), editor.name, hooks=adds_instead_of_writing(editor)):
        edit = None
        try:
            ahead = getattr(editor, "ahead", None)       # v* optimised ahead in batches (``ValuesAhead``)
            if ahead is not None:
                ahead.settle()                          # nothing left over from an edit that failed
            with timer.phase("edit"):
                edit = editor.apply(lm, cases)
            if ahead is not None and (batch := ahead.settle()) is not None:
                share_v(timer, edit, *batch)
            yield edit
        finally:
            with timer.phase("restore"):
                if edit is not None:
                    edit.restore()
                editor.reset()
