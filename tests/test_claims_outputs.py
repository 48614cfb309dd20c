"""Issue 28, outputs: files a run writes get the usual mode (0o666 less the umask), not mkstemp's 0600; the run
JSON and latest.json are published together or not at all (a full disk on the second leaves neither, and the
terminal line says where the run went); control characters in fields never reach the terminal raw."""
from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest

from harness import run as run_module
from harness.run import BenchmarkRun, atomic_write_text

from .test_report_writing import _record


@pytest.fixture
def umask():
    """Set a umask for the test (restored after)."""
    old = os.umask(0o022)
    os.umask(old)

    def set_mask(mask: int) -> None:
        os.umask(mask)
    yield set_mask
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _run(n: int = 3) -> BenchmarkRun:
    run = BenchmarkRun()
    for i in range(n):
        run.add(_record(i))
    return run


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_outputs_get_the_usual_mode(tmp_path, umask, mask):
    """Before: 0600 for every output (mkstemp's mode survived the rename)."""
    from harness.merge import write_merged
    from harness.report.html import write_html

    umask(mask)
    run = _run()
    path = run.write(tmp_path)
    data = json.loads(path.read_text())
    html = write_html(data, tmp_path / "run.html")
    merged = write_merged(data, tmp_path / "merged" / "merged.json")
    for p in [path, tmp_path / "latest.json", html, *merged, atomic_write_text(tmp_path / "x.txt", "x")]:
        assert _mode(p) == 0o666 & ~mask, p


def _full_disk_on(monkeypatch, name: str, folder: Path | None = None) -> None:
    """The temporary file of ``name`` (in ``folder``, when given) cannot be written: ENOSPC."""
    real = run_module._write_temp

    def write_temp(path: Path, text: str) -> str:
        if path.name == name and (folder is None or path.parent == folder):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path, text)
    monkeypatch.setattr(run_module, "_write_temp", write_temp)


def test_full_disk_on_the_second_file_publishes_neither(tmp_path, monkeypatch):
    """Before: a complete run-<id>.json beside the older latest.json."""
    (tmp_path / "latest.json").write_text('{"older": true}')
    _full_disk_on(monkeypatch, "latest.json")
    run = _run()
    with pytest.raises(OSError) as e:
        run.write(tmp_path)
    assert e.value.errno == errno.ENOSPC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json"]     # no run file, no temporary file
    assert json.loads((tmp_path / "latest.json").read_text()) == {"older": True}


def test_full_disk_is_one_line_saying_where_the_run_went(tmp_path, monkeypatch):
    from harness import plugin

    reports = tmp_path / "reports"
    reports.mkdir()
    (reports / "latest.json").write_text('{"older": true}')
    _full_disk_on(monkeypatch, "latest.json", reports)
    collector = _collector(plugin, tmp_path, reports, monkeypatch)
    collector.pytest_sessionfinish(SimpleNamespace(exitstatus=0))
    line, written = str(collector.paths[0]), Path(collector.paths[1])
    assert "\n" not in line and "No space left on device" in line and "the run JSON could not be written" in line
    assert str(written.parent) in line and written.is_file() and json.loads(written.read_text())["records"]
    assert sorted(p.name for p in reports.iterdir()) == ["latest.json"]


def test_full_disk_everywhere_says_the_results_are_only_in_the_summary(tmp_path, monkeypatch):
    from harness import plugin

    reports = tmp_path / "reports"
    _full_disk_on(monkeypatch, "latest.json")
    collector = _collector(plugin, tmp_path, reports, monkeypatch)
    collector.pytest_sessionfinish(SimpleNamespace(exitstatus=0))     # no traceback at the end of the run
    (line,) = [str(p) for p in collector.paths]
    assert line.startswith("(the run JSON could not be written") and "only in this summary" in line


class _Terminal:
    def __init__(self):
        self.lines: list[str] = []

    def section(self, title):
        self.lines.append(f"== {title}")

    def write_line(self, line):
        self.lines.append(line)


def test_terminal_summary_escapes_control_characters(tmp_path, monkeypatch):
    """Before: ESC from a case subject, editor name or message reached the terminal raw."""
    from harness import plugin

    options = {"report_dir": str(tmp_path), "no_report": True, "baseline": None}
    config = SimpleNamespace(getoption=options.get, rootpath=tmp_path, stash={},
                             hook=SimpleNamespace(pytest_harness_update_run_json=lambda **kw: None))
    monkeypatch.setattr(plugin, "_SESSION", "session")
    skipped = SimpleNamespace(skip_summary=lambda: "1 case left out: c9 (subject 'Tor\x1b[31monto' is empty)")
    config.stash["session"] = SimpleNamespace(options=SimpleNamespace(report_dir=str(tmp_path)), _cases=skipped)
    run = BenchmarkRun()
    for i in range(2):
        rec = _record(i, editor="ro\x1b[31mme")
        rec.update(subject="Tor\x1b[31monto\x07", case_id=f"c\x1b[2J{i}", outcome="failed",
                   message="efficacy \x1b[31mlow\x1b[0m\r\x08")
        run.add(rec)
    collector = plugin.RunCollector(config, run)
    collector.paths.append(Path("/tmp/run-\x1b[31m.json"))
    term = _Terminal()
    collector.pytest_terminal_summary(term)
    text = "\n".join(term.lines)
    assert "ro\\x1b[31mme" in text and "Tor\\x1b[31monto" in text     # visible, escaped
    assert not any(ch in text for ch in "\x1b\x07\x08\r"), repr(text)


# ------------------------------------------------------------------------------------------------ provenance
TESTS = Path(__file__).parent


def test_knowedit_file_provenance_has_its_sha256():
    """Before: ``knowedit:FILE`` was taken for a file named "knowedit:FILE" (kind file, sha256 null)."""
    from harness import provenance as prov

    path = TESTS / "data" / "knowedit" / "zsre.json"
    d = prov.dataset_provenance(f"knowedit:{path}", None, ["1", "2"])
    assert d["kind"] == "knowedit" and d["path"] == str(path)
    assert d["sha256"] == prov.sha256_file(path) is not None


def _session_with_hparams_file():
    from harness.editors import registry
    from harness.editors.easyedit_hparams import map_easyedit_hparams
    from harness.session import HarnessSession, Options

    path = TESTS / "data" / "easyedit" / "rome-gpt2-xl.yaml"
    session = HarnessSession(Options(editors=["rome"], dataset="builtin", n_cases=2,
                                     hparams_file=[("rome", str(path))], progress=False))
    with pytest.warns(UserWarning):                          # the plugin's start-up mapping (warns per ignored key)
        mapping = map_easyedit_hparams(path, registry.get("rome"))
    return session, path, {"rome": mapping}


def test_controller_provenance_includes_the_hparams_file(tmp_path, monkeypatch):
    """Under xdist the controller builds no editor: before, it re-derived ROME's hyper-parameters from the family
    file alone (layer 5, mom2_adjustment on for llama), not from ``--hparams-file``."""
    from harness import plugin
    from harness import provenance as prov

    session, path, files = _session_with_hparams_file()
    out = prov.collect(session, model={"family": "llama", "n_layers": 48}, hparams_files=files)
    rome = out["editors"]["rome"]
    assert session._editors == {} and rome["hparams"]["layer"] == 17 and rome["hparams"]["mom2_adjustment"] is False
    assert rome["hparams_file"]["path"] == str(path) and rome["hparams_file"]["sha256"] == prov.sha256_file(path)
    # the plugin's controller hands the start-up mapping to collect
    config = SimpleNamespace(getoption={"no_report": True, "baseline": None}.get, rootpath=tmp_path,
                             stash={"session": session, plugin._HPARAMS_FILES: files},
                             hook=SimpleNamespace(pytest_harness_update_run_json=lambda **kw: None))
    monkeypatch.setattr(plugin, "_SESSION", "session")
    run = _run(1)
    run.records[0]["model"] = {"family": "llama", "n_layers": 48}
    data = plugin.RunCollector(config, run)._run_json()
    assert data["provenance"]["editors"]["rome"]["hparams"]["layer"] == 17
    assert data["provenance"]["editors"]["rome"]["hparams_file"]["sha256"] == prov.sha256_file(path)


def _collector(plugin, tmp_path, reports, monkeypatch):
    """The plugin's RunCollector on a stand-in config writing to ``reports``."""
    options = {"report_dir": str(reports), "no_report": False, "baseline": None}
    config = SimpleNamespace(getoption=options.get, rootpath=tmp_path, stash={},
                             hook=SimpleNamespace(pytest_harness_update_run_json=lambda **kw: None))
    monkeypatch.setattr(plugin, "_SESSION", "session")
    config.stash["session"] = SimpleNamespace(options=SimpleNamespace(report_dir=str(reports)))
    return plugin.RunCollector(config, _run())
