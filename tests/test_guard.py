"""The harness guards the model whatever an editor declares (issue 27, item 5): after every restore every parameter,
buffer and hook is checked; a tensor written without being declared, or a hook left behind, is a RestoreError naming
it, and the model is put back, so an editor run after it measures the unedited model."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from harness.editing import RestoreError, edited, guarded
from harness.editors.base import Capabilities, Edit, Editor
from harness.models.snapshot import param_digest

pytest_plugins = ["pytester"]
SUITES = Path(__file__).resolve().parents[1] / "suites"

# the test editors: also written to a plugin module for the suite runs below (registered on import)
EDITORS = '''
import torch
from harness.editors.base import Capabilities, Edit, Editor, register_editor


@register_editor
class Leaky(Editor):
    """Declares layer 1's MLP output projection, writes layer 2's too (and restores only what it declared)."""
    name = "leaky"
    capabilities = Capabilities(changes="weights")

    def edited_parameters(self, lm):
        return [lm.adapter.weight_name(1)]

    @torch.no_grad()
    def execute(self, lm, cases):
        for layer in (1, 2):
            w = lm.adapter.mlp_weight(lm.model, layer)
            w.add_(0.5 * torch.randn(w.shape, generator=torch.Generator().manual_seed(layer)).to(w))
        return {}


@register_editor
class Silent(Leaky):
    """A weight editor that declares no parameter at all and writes one."""
    name = "silent"

    def edited_parameters(self, lm):
        return []


@register_editor
class Hooky(Editor):
    """Hooks layer 1's MLP and never takes the hook away."""
    name = "hooky"
    capabilities = Capabilities(changes="hooks")

    def apply(self, lm, cases):
        def shift(_module, _inputs, output):
            return output + 1.0
        lm.model.get_submodule(lm.adapter.mlp_name(1)).register_forward_hook(shift)
        return Edit(self.name, [c.case_id for c in cases], undo=lambda: None)
'''


@pytest.fixture(scope="module")
def test_editors(tmp_path_factory):
    """The test editors' classes, registered (importing the module registers them)."""
    import importlib
    import sys
    d = tmp_path_factory.mktemp("guard_editors")
    (d / "guard_editors.py").write_text(EDITORS)
    sys.path.insert(0, str(d))
    try:
        return importlib.import_module("guard_editors")
    finally:
        sys.path.remove(str(d))


def _run(editor_cls, lm, case):
    editor = editor_cls({})
    with edited(lm, editor, [case]):
        pass


def test_an_undeclared_weight_write_is_caught_and_put_back(tiny_llama, builtin_cases, test_editors):
    before = param_digest(tiny_llama.model)
    with pytest.raises(RestoreError) as e:
        _run(test_editors.Leaky, tiny_llama, builtin_cases[0])
    assert tiny_llama.adapter.weight_name(2) in str(e.value)             # names the tensor it wrote undeclared
    assert tiny_llama.adapter.weight_name(1) not in str(e.value)         # the declared one was restored by its snapshot
    assert param_digest(tiny_llama.model) == before                      # put back


def test_a_weight_editor_declaring_nothing_is_caught(tiny_llama, builtin_cases, test_editors):
    before = param_digest(tiny_llama.model)
    with pytest.raises(RestoreError) as e:
        _run(test_editors.Silent, tiny_llama, builtin_cases[0])
    assert tiny_llama.adapter.weight_name(1) in str(e.value) and tiny_llama.adapter.weight_name(2) in str(e.value)
    assert param_digest(tiny_llama.model) == before


def test_a_hook_left_behind_is_removed_and_named(tiny_llama, builtin_cases, test_editors):
    module = tiny_llama.model.get_submodule(tiny_llama.adapter.mlp_name(1))
    hooks = dict(module._forward_hooks)
    with pytest.raises(RestoreError) as e:
        _run(test_editors.Hooky, tiny_llama, builtin_cases[0])
    assert "forward hook" in str(e.value) and tiny_llama.adapter.mlp_name(1) in str(e.value)
    assert dict(module._forward_hooks) == hooks                         # the harness removed it


def test_buffers_replaced_modules_and_data_writes_are_guarded(tiny_llama):
    model = tiny_llama.model
    name, buf = next(iter(model.named_buffers()))
    before = buf.clone()
    with pytest.raises(RestoreError, match=name.replace(".", r"\.")):
        with guarded(tiny_llama, None, "a test"):
            with torch.no_grad():
                buf.mul_(2)
    assert torch.equal(buf, before)
    mlp = tiny_llama.adapter.mlp_name(0)
    parent = model.get_submodule(mlp.rsplit(".", 1)[0])
    original = getattr(parent, mlp.rsplit(".", 1)[1])
    with pytest.raises(RestoreError, match="replaced"):
        with guarded(tiny_llama, None, "a test"):
            setattr(parent, mlp.rsplit(".", 1)[1], torch.nn.Identity())
    assert getattr(parent, mlp.rsplit(".", 1)[1]) is original


def test_well_behaved_editors_pass_the_guard(tiny_llama, builtin_cases):
    from harness.editors import build_editor
    for name, hp in (("ft", ["layer=1", "num_steps=2"]), ("grace", ["layer=2", "n_iter=2"]), ("ike", ["k=1"])):
        editor = build_editor(name, tiny_llama, hp)
        editor.prepare(tiny_llama)
        with edited(tiny_llama, editor, [builtin_cases[0]]):
            pass


# --- through the real suite: an editor after them measures the unedited model -----------------------------------
def _suite(pytester, model_dir, *editors):
    reports = pytester.path / f"reports{len(list(pytester.path.glob('reports*')))}"
    pytester.makepyfile(guard_editors=EDITORS)
    args = [str(SUITES / "test_single_edit.py"), "--model", str(model_dir), "--device", "cpu",
            "--cache-dir", str(pytester.path / "cache"), "--report-dir", str(reports), "--ppl-texts", "8",
            "--cases", "2", "-p", "no:cacheprovider", "-p", "guard_editors", "--hparam", "ft.layer=1",
            "--hparam", "ft.num_steps=3", "--no-wild", "--no-fluency", "--min-efficacy", "0",
            "--collapse-ratio", "1e6"]
    for e in editors:
        args += ["--editor", e]
    result = pytester.runpytest_subprocess(*args)
    return result, json.loads((reports / "latest.json").read_text())["records"]


def test_an_editor_after_a_leaky_and_a_hooking_one_gives_the_clean_records(pytester, tiny_model_dir):
    dirty, records = _suite(pytester, tiny_model_dir, "leaky", "hooky", "ft")
    dirty.assert_outcomes(passed=2, failed=4)
    out = dirty.stdout.str()
    assert "RestoreError" in out and "model.layers.2.mlp.down_proj.weight" in out and "forward hook" in out
    clean, clean_records = _suite(pytester, tiny_model_dir, "ft")
    clean.assert_outcomes(passed=2)
    ft_after = {r["case_id"]: r["metrics"] for r in records if r["editor"] == "ft_l"}
    ft_clean = {r["case_id"]: r["metrics"] for r in clean_records if r["editor"] == "ft_l"}
    assert ft_after.keys() == ft_clean.keys() and len(ft_clean) == 2
    for case, metrics in ft_clean.items():
        assert ft_after[case] == metrics, case
