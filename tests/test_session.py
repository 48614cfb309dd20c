"""HarnessSession in-process on the tiny model saved to disk: state is loaded once and kept; a failed model load is
remembered and reported in one line, not retried."""
from __future__ import annotations

from pathlib import Path

import pytest

from harness import session as session_module
from harness.session import HarnessSession, ModelUnavailable, Options

from .conftest import TINY_HPARAMS

pytest_plugins = ["pytester"]


def tiny_options(model_dir, tmp_path, **kw) -> Options:
    """Options for a session on the tiny model: small statistics and text sets, a private cache and report dir."""
    base = dict(model=str(model_dir), device="cpu", cache_dir=str(tmp_path / "cache"), stats_tokens=2000,
                ppl_texts=8, n_cases=2, dataset="builtin", report_dir=str(tmp_path / "reports"), progress=False,
                hparams=[f"{name}.{h}" for name in ("rome", "ft") for h in TINY_HPARAMS[name]])
    return Options(**{**base, **kw})


def test_state_is_loaded_once(tiny_model_dir, tmp_path, monkeypatch):
    calls = []
    real = session_module.load_model

    def counting(*a, **k):
        calls.append(a)
        return real(*a, **k)
    monkeypatch.setattr(session_module, "load_model", counting)
    h = HarnessSession(tiny_options(tiny_model_dir, tmp_path))
    assert h.lm is h.lm and len(calls) == 1
    assert h.lm.identity["family"] == "llama"
    assert h.cases() is h.cases() and len(h.cases()) == 2
    assert len(h.cases(limit=None)) > 2                       # another limit: another list, the run's kept
    assert h.editor("rome") is h.editor("rome")
    assert h.new_editor("rome") is not h.editor("rome")
    assert len(h.ppl_texts()) == 8 and h.ppl_texts() is h.ppl_texts()
    base = h.base_perplexity()
    assert h.base_perplexity() is base and h.perplexity().mean_ppl == pytest.approx(base.mean_ppl)
    assert h.machine() is h.machine() and h.machine()["device"] == "cpu"
    assert h.drift_reference() is h.drift_reference()
    assert h.sweep_layers() == [0] and len(calls) == 1        # every:6 on a 4-layer model


def test_failed_model_load_is_remembered(tmp_path, monkeypatch):
    calls = []
    real = session_module.load_model

    def counting(*a, **k):
        calls.append(a)
        return real(*a, **k)
    monkeypatch.setattr(session_module, "load_model", counting)
    h = HarnessSession(tiny_options(tmp_path / "no-such-model", tmp_path))
    messages = []
    for _ in range(3):
        with pytest.raises(ModelUnavailable) as e:
            h.lm
        messages.append(str(e.value))
    assert len(calls) == 1                                      # tried once
    assert len(set(messages)) == 1 and "\n" not in messages[0]
    assert messages[0].startswith(f"--model {tmp_path / 'no-such-model'}: ") and "not a model directory" in messages[0]
    with pytest.raises(ModelUnavailable):
        h.editor("rome")                                        # everything that needs the model says the same


def test_a_failed_load_stops_the_session_in_one_line(pytester):
    """Through the plugin: the first test reports the load failure in one line, the session stops there."""
    suites = Path(__file__).resolve().parents[1] / "suites"
    result = pytester.runpytest(str(suites / "test_single_edit.py"), "--model", "/no/such/dir",   # in-process
                                "--editor", "rome", "--cases", "3", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["--model /no/such/dir: not a model directory*",
                                 "*Interrupted: the model could not be loaded*"])
    assert "Traceback" not in result.stdout.str()


def test_a_failed_load_while_collecting_is_one_line(pytester):
    """The tracing suite parametrizes from the model's known facts while collecting: a model that cannot be loaded
    then stops the session with one line (usage error), not one collection error per suite module."""
    suites = Path(__file__).resolve().parents[1] / "suites"
    result = pytester.runpytest(str(suites / "test_tracing.py"), str(suites / "test_editing_problems.py"),  # in-process
                                "--model", "/no/such/dir", "--editor", "rome", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    out = result.stdout.str() + result.stderr.str()
    assert out.count("not a model directory") == 1, out
    assert "the model could not be loaded: --model /no/such/dir: not a model directory" in out
    assert "Traceback" not in out and "ERROR collecting" not in out


def test_a_stream_longer_than_the_dataset_is_a_one_line_error(tiny_model_dir, tmp_path):
    """--seq-edits 1000 on a 40-case set once ran a 40-edit stream under the 1,000-edit name; now it is refused,
    naming the set, its size and the way out."""
    from harness.data import DataError
    h = HarnessSession(tiny_options(tiny_model_dir, tmp_path, seq_edits=1000))
    with pytest.raises(DataError) as e:
        h.stream_cases()
    msg = str(e.value)
    assert "\n" not in msg and "--seq-edits 1000: dataset 'builtin' has only 40 usable cases" in msg
    assert "counterfact-easyedit" in msg
    h = HarnessSession(tiny_options(tiny_model_dir, tmp_path, seq_edits=40))
    assert len(h.stream_cases()) == 40
