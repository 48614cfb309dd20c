"""The option table: each parser accepts what its help says and rejects the rest; a bad value on the command line
is a usage error at start-up (exit 4) in one line naming the option and what it accepts; the Options dataclass and
the Thresholds take their defaults from the table."""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from harness import options as opt
from harness.options import OPTIONS, OptionError, Options
from harness.thresholds import Thresholds

pytest_plugins = ["pytester"]


@pytest.mark.parametrize("parse,raw,value", [
    (opt.integer(1, allow_all=True), "3", 3),
    (opt.integer(1, allow_all=True), "all", None),
    (opt.integer(1), "10", 10),
    (opt.number(), "0", 0.0),
    (opt.number(), "1e6", 1e6),
    (opt.number(), "inf", float("inf")),
    (opt.ppl_schedule, "every", "every"),
    (opt.ppl_schedule, "every:4", "every:4"),
    (opt.ppl_schedule, "geometric", "geometric"),
    (opt.layer_spec, "every:3", "every:3"),
    (opt.layer_spec, "all", "all"),
    (opt.layer_spec, "0, 5,-1", "0,5,-1"),
    (opt.int_list, "1,3", [1, 3]),
    (opt.comma_list, "boolq, piqa", ["boolq", "piqa"]),
    (opt.device, "cpu", "cpu"),
    (opt.device, "auto", "auto"),
])
def test_parsers_accept(parse, raw, value):
    assert parse(raw) == value


@pytest.mark.parametrize("parse,raw,accepted", [
    (opt.integer(1, allow_all=True), "0", "an integer >= 1 or all"),
    (opt.integer(1, allow_all=True), "-1", "an integer >= 1 or all"),
    (opt.integer(1, allow_all=True), "ten", "an integer >= 1 or all"),
    (opt.integer(1), "0", "an integer >= 1"),
    (opt.integer(1), "all", "an integer >= 1"),
    (opt.number(), "-0.1", "a number >= 0"),
    (opt.number(), "nan", "a number >= 0"),
    (opt.number(0.0, exclusive=True), "0", "a number > 0"),
    (opt.ppl_schedule, "bogus", "every, every:K (K >= 1) or geometric"),
    (opt.ppl_schedule, "every:0", "every, every:K (K >= 1) or geometric"),
    (opt.ppl_schedule, "every:x", "every, every:K (K >= 1) or geometric"),
    (opt.layer_spec, "x", "every:K (K >= 1), all, or a comma list"),
    (opt.layer_spec, "every:0", "every:K (K >= 1), all, or a comma list"),
    (opt.int_list, "0,1", "integers >= 1"),
    (opt.int_list, "a", "integers >= 1"),
    (opt.device, "gpu", "use auto, cpu, cuda, cuda:N or mps"),
    (opt.choice("float32", "bfloat16"), "int3", "use one of float32, bfloat16"),
])
def test_parsers_reject_naming_what_is_accepted(parse, raw, accepted):
    with pytest.raises(OptionError, match=accepted.replace("(", r"\(").replace(")", r"\)")):
        parse(raw)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_rejected():
    for raw in ("cuda", "cuda:0"):
        with pytest.raises(OptionError, match="CUDA is not available on this machine"):
            opt.device(raw)


def test_report_dir_must_be_writable(tmp_path):
    assert opt.writable_dir(str(tmp_path / "new" / "deeper")) == str(tmp_path / "new" / "deeper")
    assert not (tmp_path / "new").exists()                    # checked, not created
    afile = tmp_path / "a-file"
    afile.write_text("x")
    with pytest.raises(OptionError, match="is a file, not a folder"):
        opt.writable_dir(str(afile / "reports"))
    with pytest.raises(OptionError, match="is a file, not a folder"):
        opt.writable_dir(str(afile))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_report_dir_is_rejected(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(OptionError, match="cannot be written"):
            opt.writable_dir(str(ro / "reports"))
    finally:
        ro.chmod(0o755)


def test_read_only_filesystem_is_rejected(monkeypatch, tmp_path):
    """A read-only mount (EROFS on create), simulated where the tests run as root."""
    def refuse(*_a, **_k):
        raise OSError(30, "Read-only file system")
    monkeypatch.setattr(opt.tempfile, "TemporaryFile", refuse)
    with pytest.raises(OptionError, match=r"cannot be written \(Read-only file system\)"):
        opt.writable_dir(str(tmp_path / "reports"))


def test_defaults_come_from_the_table():
    o = Options()
    table = {r.dest: r.default for r in OPTIONS}
    assert o.seq_edits == table["seq_edits"] == 10 and o.n_cases == table["cases"] and o.editors == table["editor"]
    assert o.editors is not Options().editors                 # mutable defaults are not shared
    t = Thresholds()
    by_field = {r.threshold: r.default for r in OPTIONS if r.threshold}
    assert {f.name for f in dataclasses.fields(Thresholds)} == set(by_field)
    assert all(getattr(t, k) == v for k, v in by_field.items())
    # every row parses its own default (what the ini default and the help text show)
    for r in OPTIONS:
        if r.kind == "value" and r.default is not None and r.parse is not opt.writable_dir:
            raw = ",".join(map(str, r.default)) if isinstance(r.default, list) else str(r.default)
            assert r.parse(raw) == r.default, r.dest


@pytest.fixture
def suite_dir(pytester):
    pytester.makepyfile(test_x="def test_x():\n    pass\n")
    return pytester


@pytest.mark.parametrize("args,line", [
    (["--ppl-schedule", "bogus"], "--ppl-schedule bogus: use every, every:K (K >= 1) or geometric"),
    (["--sweep-layers", "x"], "--sweep-layers x: use every:K (K >= 1), all, or a comma list of layers*"),
    (["--batch-size", "0"], "--batch-size 0: expected an integer >= 1"),
    (["--cases", "0"], "--cases 0: expected an integer >= 1 or all (use all for every one)"),
    (["--cases", "-1"], "--cases -1: expected an integer >= 1 or all (use all for every one)"),
    (["--seq-edits", "0"], "--seq-edits 0: expected an integer >= 1"),
    (["--seq-edits", "-1"], "--seq-edits -1: expected an integer >= 1"),
    (["--collapse-ratio", "abc"], "--collapse-ratio abc: expected a number > 0"),
    (["--sweep-windows", "0"], "--sweep-windows 0: expected integers >= 1 separated by commas*"),
    (["--dtype", "int3"], "--dtype int3: use one of float32, *"),
    (["--device", "tpu"], "--device tpu: use auto, cpu, cuda, cuda:N or mps"),
    (["--editor", "nope"], "--editor nope: unknown editor; available: *"),
    (["--downstream-tasks", "boolq,nope"], "--downstream-tasks: unknown downstream task 'nope'*"),
])
def test_bad_values_are_one_line_usage_errors(suite_dir, args, line):
    result = suite_dir.runpytest("-p", "no:cacheprovider", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: {line}"])
    assert len([x for x in result.stderr.lines if x.strip()]) == 1, result.stderr.lines


def test_unwritable_report_dir_fails_at_start_up(suite_dir):
    (suite_dir.path / "a-file").write_text("x")
    result = suite_dir.runpytest("-p", "no:cacheprovider", "--report-dir", "a-file/reports")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: --report-dir */a-file/reports: */a-file is a file, not a folder; "
                                 "choose another --report-dir"])
    result.stdout.no_fnmatch_line("*test_x*")                 # nothing ran


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_fails_at_start_up(suite_dir):
    result = suite_dir.runpytest("-p", "no:cacheprovider", "--device", "cuda")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: --device cuda: CUDA is not available on this machine*"])


def test_ini_values_and_command_line_precedence(suite_dir):
    """ini keys set the thresholds and counts; the command line wins; a bad ini value names the option too."""
    suite_dir.makeini("[pytest]\nharness_collapse_ratio = 3.5\nharness_cases = all\n")
    suite_dir.makeconftest(
        "def pytest_sessionfinish(session):\n"
        "    from harness.plugin import _SESSION\n"
        "    h = session.config.stash[_SESSION]\n"
        "    print('VALUES', h.thresholds.collapse_ppl_ratio, h.options.n_cases, h.options.seq_edits)\n")
    result = suite_dir.runpytest("-p", "no:cacheprovider", "-s", "--seq-edits", "4")
    result.stdout.fnmatch_lines(["*VALUES 3.5 None 4*"])
    result = suite_dir.runpytest("-p", "no:cacheprovider", "-s", "--collapse-ratio", "1.5", "--cases", "2")
    result.stdout.fnmatch_lines(["*VALUES 1.5 2 10*"])
    suite_dir.makeini("[pytest]\nharness_cases = 0\n")
    result = suite_dir.runpytest("-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: --cases 0: expected an integer >= 1 or all*"])


def test_help_lists_defaults_and_ini_keys(suite_dir):
    out = "\n".join(suite_dir.runpytest("--help").stdout.lines)
    assert "--seq-edits=SEQ_EDITS" in out and "--collapse-ratio" in out
    assert "harness_collapse_ratio" in out and "(default: 10" in out
