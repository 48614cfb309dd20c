"""A harness error inside a test (a layer the model lacks, a bad data file, a leftover edit) is reported as its one
line (cause and fix), not a traceback of the harness's internals (issue 28)."""
from __future__ import annotations

from pathlib import Path

pytest_plugins = ["pytester"]
SUITES = Path(__file__).resolve().parents[1] / "suites"


def test_a_harness_error_in_a_test_is_one_line(pytester, tiny_model_dir):
    result = pytester.runpytest(
        str(SUITES / "test_single_edit.py"), "--model", str(tiny_model_dir), "--editor", "rome", "--cases", "1",
        "--dataset", "builtin", "--stats-tokens", "600", "--cache-dir", str(pytester.path / "cache"),
        "--report-dir", str(pytester.path / "reports"), "-p", "no:cacheprovider")
    out = result.stdout.lines
    start = next(i for i, line in enumerate(out) if "ERROR at setup of test_single_edit[rome-b01]" in line)
    block = [line for line in out[start + 1:] if not line.startswith(("----", "Loading weights", "===="))]
    assert block[0] == ("HparamsError: editor 'rome': layer 5 does not exist in a 4-layer model; pass --hparam "
                        "rome.layer=N with 0 <= N < 4")
    assert not any("Traceback" in line or line.startswith(">") or "harness/" in line for line in out[start:])
