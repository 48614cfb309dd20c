"""docs/writing-an-editor.md's editor is real code: read from the page, registered, built from its hyper-parameters
(with an override), benchmarked with the single-edit protocol on the tiny model: the edit takes and is undone."""
from __future__ import annotations

import re
import sys
import types
from pathlib import Path

from harness import protocols
from harness.editors import registry
from harness.models import param_digest
from harness.session import HarnessSession
from harness.timing import PhaseTimer

from .test_session import tiny_options

DOC = Path(__file__).resolve().parents[1] / "docs" / "writing-an-editor.md"


def _doc_module(monkeypatch) -> types.ModuleType:
    """The page's python block as a module (registered in sys.modules for the test only, as is its editor)."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) == 1, "the page holds one editor"
    module = types.ModuleType("writing_an_editor")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(registry, "_classes", dict(registry._classes))
    exec(compile(blocks[0], str(DOC), "exec"), module.__dict__)
    return module


def test_the_documented_editor_edits_and_is_undone(tiny_model_dir, tmp_path, monkeypatch):
    doc = _doc_module(monkeypatch)
    assert registry.get("tiny_ft") is doc.TinyFT
    h = HarnessSession(tiny_options(tiny_model_dir, tmp_path, editors=["tiny_ft"],
                                    hparams=["tiny_ft.layer=-2", "tiny_ft.steps=20"]))
    editor = h.editor("tiny_ft")
    assert (editor.hparams.layer, editor.hparams.steps, editor.hparams.lr) == (2, 20, 0.05)   # -2 of 4 layers
    before = param_digest(h.lm.model)
    case = h.cases()[0]
    m = protocols.single_edit(h, editor, case, PhaseTimer())
    assert param_digest(h.lm.model) == before
    assert m.metrics["efficacy_success_pre"] == 0.0 and m.metrics["efficacy_success"] == 1.0
    assert m.metrics["efficacy_magnitude"] > m.metrics["efficacy_magnitude_pre"]
    assert isinstance(m.info["final_loss"], float)                 # execute()'s dict is the record's info
