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


@contextlib.contextmanager
def unchanged(lm: LoadedModel, names: Sequence[str], what: str) -> Iterator[None]:
    """On exit (also on an error), raise :class:`RestoreError` if the parameters ``names`` are not bit-identical
    to what they were on entry. Used around a single edit and around a whole sequential stream."""
    before = param_digest(lm.model, list(names)) if names else None
    try:
        yield
    finally:
        if before is not None and param_digest(lm.model, list(names)) != before:
            raise RestoreError(f"restore after {what} was not bit-exact for {list(names)}")


@contextlib.contextmanager
def edited(lm: LoadedModel, editor: Editor, cases: Sequence[EditCase], timer: PhaseTimer | None = None
           ) -> Iterator[Edit]:
    """Apply ``editor`` to ``cases`` (timed as "edit") and yield the :class:`Edit`; on exit restore the model and
    reset the editor (timed as "restore"), then check the restore by digest."""
    timer = timer or PhaseTimer(lm.device)
    with unchanged(lm, checked_parameters(lm, editor), editor.name):
        edit = None
        try:
            with timer.phase("edit"):
                edit = editor.apply(lm, cases)
            yield edit
        finally:
            with timer.phase("restore"):
                if edit is not None:
                    edit.restore()
                editor.reset()
