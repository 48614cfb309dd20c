"""Editor name aliases: another name for a registered editor, accepted wherever an editor is named (``--editor``,
``--hparam EDITOR.KEY=...``, ``--hparams-file EDITOR=...``) and resolved to the canonical name everywhere after it
(the editor instance, the run's records and provenance, the leaderboard's rows, ``harness compare``'s matching).

Kept apart from ``harness.editors`` (whose import loads every editor and transformers) so that the reports can
resolve names of old runs cheaply.
"""
from __future__ import annotations

from typing import Any

# alias -> canonical editor name
ALIASES: dict[str, str] = {
    "ft": "ft_l",       # the FT-L baseline of ROME's paper, under the name the README's first runs used
}


def register_alias(alias: str, name: str) -> None:
    """Declare ``alias`` as another name for editor ``name`` (a canonical name, not another alias)."""
    if alias == name:
        return
    if ALIASES.get(alias, name) != name:
        raise ValueError(f"editor alias {alias!r} already names {ALIASES[alias]!r}")
    ALIASES[alias] = ALIASES.get(name, name)


def canonical_editor(name: Any) -> Any:
    """The canonical name of an editor name (itself when it is not an alias; non-strings unchanged)."""
    return ALIASES.get(name, name) if isinstance(name, str) else name
