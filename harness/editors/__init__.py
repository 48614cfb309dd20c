"""Editors: importing this package registers the built-in ones."""
from .base import Edit, Editor, EditorRegistry, HparamsError, UnknownEditorError, build_editor, registry, register_editor
from . import alphaedit, d4s, emmet, ft, memit, r_rome, rome  # noqa: F401  (registration)
from . import encore, grace, ike, lora, wise  # noqa: F401  (registration: editor families beyond locate-then-edit)

__all__ = ["Edit", "Editor", "EditorRegistry", "HparamsError", "UnknownEditorError", "build_editor", "registry",
           "register_editor"]
