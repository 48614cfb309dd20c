"""Editors declare what they need (issue 27, item 4), and what a third-party editor brings is first-class: a broken
entry point is one warning, a package's own hparams files and ``alg_name`` work, provenance records each editor's
code identity, the leaderboard says what each ``editor@hash`` stands for and ``compare`` notes a changed editor."""
from __future__ import annotations

import hashlib
import importlib.metadata
import types
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.editors import registry
from harness.editors.base import (BrokenEntryPointWarning, Capabilities, Editor, EditorRegistry, UnknownEditorError,
                                  load_hparams)
from harness.editors.common import AheadPlan, ValuesAhead

EXPECTED = {"rome": ("weights", False, True, True), "r_rome": ("weights", False, True, True),
            "memit": ("weights", True, True, True), "alphaedit": ("weights", True, True, True),
            "emmet": ("weights", True, True, True), "encore": ("weights", True, True, True),
            "d4s": ("weights", True, True, True), "ft_l": ("weights", True, False, False),
            "ft_m": ("weights", True, False, False), "grace": ("hooks", False, False, False),
            "wise": ("hooks", False, False, False), "lora": ("hooks", True, False, False),
            "ike": ("prompt_prefix", True, False, False)}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_builtin_editor_declares_its_capabilities(name):
    cls = registry.get(name)
    caps = cls.capabilities
    assert isinstance(caps, Capabilities)
    assert (caps.changes, caps.batches, caps.needs_key_stats, caps.values_ahead) == EXPECTED[name]
    assert cls.supports_batch is caps.batches                  # the older spelling reads the declaration


def test_capabilities_are_frozen_and_checked():
    with pytest.raises(ValueError, match="changes"):
        Capabilities(changes="telepathy")
    with pytest.raises(Exception):
        Capabilities().batches = True                          # frozen


def test_an_editor_setting_only_supports_batch_batches():
    class Old(Editor):
        name = "old_style"
        supports_batch = True
    assert Old.capabilities.batches and Old.capabilities.changes == "weights"


class _Holder(Editor):
    name = "holder"

    def __init__(self):
        super().__init__({})
        self.ahead = ValuesAhead()          # has the attribute, does not declare values_ahead: left alone


class _Ahead(_Holder):
    name = "ahead"
    capabilities = Capabilities(values_ahead=True)


def test_the_ahead_plan_reads_the_declaration_not_the_attribute(builtin_cases):
    plan = AheadPlan(3)
    holder, ahead = _Holder(), _Ahead()
    plan.configure(holder)
    plan.configure(ahead)
    assert holder.ahead.batch == 1 and ahead.ahead.batch == 3
    c = builtin_cases[:4]
    plan.plan([("ahead", x) for x in c] + [("holder", x) for x in c])
    plan.expect(holder, c[0])
    plan.expect(ahead, c[0])
    assert holder.ahead._expected == [] and ahead.ahead._expected == c[:3]
    assert plan.next("ahead", c[1], 5) == c[2:]


def test_a_broken_entry_point_is_one_warning_naming_it(monkeypatch):
    eps = [importlib.metadata.EntryPoint("broken_ed", "no_such_module_xyz.editor:Broken", "harness.editors"),
           importlib.metadata.EntryPoint("good_ed", f"{__name__}:_Ahead", "harness.editors")]
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group=None: [e for e in eps if e.group == group])
    reg = EditorRegistry()
    with pytest.warns(BrokenEntryPointWarning, match="broken_ed.*no_such_module_xyz"):
        names = reg.names()
    assert "good_ed" in names and "broken_ed" not in names
    assert reg.get("good_ed") is _Ahead
    with pytest.raises(UnknownEditorError, match="entry point could not be loaded"):
        reg.get("broken_ed")


@dataclass
class _LsqHparams:
    layer: int = 0
    lr: float = 0.1
    steps: int = 3


class _Lsq(Editor):
    name = "lsq_r1"
    Hparams = _LsqHparams


def test_hparams_file_accepts_a_third_party_alg_name(tmp_path):
    from harness.editors.easyedit_hparams import map_easyedit_hparams
    for alg in ("lsq_r1", "LSQ-R1"):
        f = tmp_path / f"{alg}.yaml"
        f.write_text(f"alg_name: {alg}\nlr: 0.5\nsteps: 7\n")
        mapping = map_easyedit_hparams(f, _Lsq, warn=False)
        assert mapping.hparams == {"lr": 0.5, "steps": 7}
    f.write_text("alg_name: ROME\nlr: 0.5\n")
    with pytest.raises(Exception, match="pass it as --hparams-file rome="):
        map_easyedit_hparams(f, _Lsq, warn=False)


def test_a_package_ships_its_own_per_model_hparams(tmp_path):
    folder = tmp_path / "hparams"
    folder.mkdir()
    (folder / "default.yaml").write_text("steps: 5\n")
    (folder / "llama.yaml").write_text("layer: 2\n")

    class Packaged(_Lsq):
        name = "packaged"
        hparams_dir = folder
    hp = load_hparams(Packaged, "llama", n_layers=4)
    assert (hp.layer, hp.steps, hp.lr) == (2, 5, 0.1)
    assert load_hparams(Packaged, "gpt2").layer == 0           # no gpt2.yaml: the dataclass default


def test_provenance_records_each_editors_code_identity(monkeypatch):
    from harness.provenance import SOURCE_ROOT, editor_code, resolve_editor
    rome = resolve_editor("rome", [], "llama", 4)["code"]          # an error (layer 5 of 4) still records it
    source = Path(__file__).resolve().parents[1] / "harness" / "editors" / "rome.py"
    assert {"path": "harness/editors/rome.py", "sha256": hashlib.sha256(source.read_bytes()).hexdigest()} \
        in rome["files"] and len(rome["sha256"]) == 64 and "package" not in rome
    alpha = editor_code(registry.get("alphaedit"))              # its own file and MEMIT's, which it derives from
    assert [f["path"] for f in alpha["files"]] == ["harness/editors/alphaedit.py", "harness/editors/memit.py"]
    assert SOURCE_ROOT.is_dir()
    # an entry-point editor: its package and version
    ep = types.SimpleNamespace(name="ahead", value=f"{__name__}:_Ahead",
                               dist=types.SimpleNamespace(name="my-editors", version="1.2.3"))
    monkeypatch.setattr(registry, "entry_point", lambda name: ep if name == "ahead" else None)
    code = editor_code(_Ahead)
    assert (code["package"], code["version"], code["entry_point"]) == ("my-editors", "1.2.3", f"ahead = {ep.value}")
    assert code["files"] and code["sha256"]


def _run(hparams, code, run_id):
    return {"run_id": run_id, "schema_version": 2, "model": {"name": "tiny"}, "config": {"editors": ["lsq_r1"]},
            "records": [{"suite": "single_edit", "editor": "lsq_r1", "case_id": str(i), "outcome": "passed",
                         "nodeid": f"suites/test_single_edit.py::test_single_edit[lsq_r1-{i}]",
                         "metrics": {"efficacy_success": 1.0}} for i in range(3)],
            "provenance": {"editors": {"lsq_r1": {"hparams": hparams, "files": [], "code": code}}}}


def test_the_leaderboard_says_what_each_hash_stands_for_and_compare_notes_the_change(tmp_path):
    from harness.report.compare import compare
    from harness.report.leaderboard import board_tables, to_markdown
    a = _run({"layer": 1, "lr": 0.1}, {"package": "my-editors", "version": "1.0", "sha256": "a" * 64}, "a")
    b = _run({"layer": 2, "lr": 0.1}, {"package": "my-editors", "version": "1.1", "sha256": "b" * 64}, "b")
    tables = board_tables([a, b], min_n=1)
    legend = tables[0].legend
    assert len(legend) == 2 and all(k.startswith("lsq_r1@") for k in legend)
    assert sorted(legend.values()) == ["layer=1; my-editors 1.0", "layer=2; my-editors 1.1"]
    md = to_markdown(tables, 1)
    assert "layer=2; my-editors 1.1" in md
    from harness.report.leaderboard import write_leaderboard
    _, html = write_leaderboard([a, b], tmp_path, min_n=1)
    page = html.read_text()
    assert "layer=1; my-editors 1.0" in page and "layer=2; my-editors 1.1" in page    # the page says it too
    result = compare(a, b)
    assert result.refused is None
    notes = [n for n in result.notes if "editor code or settings differ" in n]
    assert len(notes) == 1 and "my-editors 1.0" in notes[0] and "layer 1 vs 2" in notes[0]
    assert not [n for n in compare(a, a).notes if "editor code" in n]
