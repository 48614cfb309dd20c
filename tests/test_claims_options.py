"""Issue 28's start-up claims (and issue 27's editor prefix): a bad ``--hparam`` value is a usage error at start-up
(exit 4, one line), not a 132-line error at each test's setup or a raw traceback: its type, the constraints its
hyper-parameter declares (field metadata: steps >= 1, finite rates > 0, ...) and, from the model's config read
without its weights, its layer range; an unknown editor before the '.' names the known editors. ``pytest --help``
says where the statistics come from without a data dir (model samples, as the run does)."""
from __future__ import annotations

import dataclasses
import struct
from pathlib import Path

import pytest

from harness.editors import HparamsError, registry
from harness.editors.base import load_hparams
from harness.options import Options

pytest_plugins = ["pytester"]


@pytest.fixture
def suite_dir(pytester):
    pytester.makepyfile(test_x="def test_x():\n    pass\n")
    return pytester


def _one_usage_error(result, line: str) -> None:
    assert result.ret == pytest.ExitCode.USAGE_ERROR, result.stdout.str()
    result.stderr.fnmatch_lines([f"ERROR: {line}"])
    assert len([x for x in result.stderr.lines if x.strip()]) == 1, result.stderr.lines
    result.stdout.no_fnmatch_line("*test_x*")                 # nothing ran


@pytest.mark.parametrize("hparam,line", [
    ("rome.layer=abc", "--hparam rome.layer=abc: editor 'rome': hyper-parameter layer='abc' is not a valid int*"),
    ("rome.layer=999", "--hparam rome.layer=999: editor 'rome': layer 999 does not exist in a 4-layer model; "
                       "pass --hparam rome.layer=N with 0 <= N < 4"),
    ("memit.layers=[1,9]", "--hparam memit.layers=[[]1,9]: editor 'memit': layer 9 does not exist in a 4-layer "
                           "model; pass --hparam memit.layers=[[]N,...] with 0 <= N < 4"),
    ("rome.v_num_grad_steps=-3", "--hparam rome.v_num_grad_steps=-3: editor 'rome': hyper-parameter "
                                 "v_num_grad_steps=-3 must be >= 1; pass e.g. --hparam rome.v_num_grad_steps=20"),
    ("rome.v_lr=nan", "--hparam rome.v_lr=nan: editor 'rome': hyper-parameter v_lr=nan is not a number (NaN)*"),
    ("v_lr=inf", "--hparam v_lr=inf: editor 'rome': hyper-parameter v_lr=inf is not finite*"),
    ("ft.lr=0", "--hparam ft.lr=0: editor 'ft*': hyper-parameter lr=0 must be > 0*"),
    ("grace.val_init=hot", "--hparam grace.val_init=hot: editor 'grace': hyper-parameter val_init='hot' is not one "
                           "of cold, warm*"),
    ("lsq_rl.v_steps=5", "--hparam lsq_rl.v_steps=5: unknown editor 'lsq_rl' before the '.'; known editors: "
                         "*memit*rome*"),
])
def test_bad_hparams_are_one_line_usage_errors_at_start_up(suite_dir, tiny_model_dir, hparam, line):
    """Before: layer=abc / =999 failed at each test's setup after the model loaded (exit 1, 132 lines), -3 and nan
    gave raw tracebacks, and an unknown editor prefix an INTERNALERROR (exit 3)."""
    result = suite_dir.runpytest("-p", "no:cacheprovider", "--model", str(tiny_model_dir), "--editor", "rome",
                                 "--editor", "memit", "--hparam", hparam)
    _one_usage_error(result, line)


def test_good_hparams_still_start(suite_dir, tiny_model_dir):
    result = suite_dir.runpytest("-p", "no:cacheprovider", "--model", str(tiny_model_dir), "--editor", "rome",
                                 "--hparam", "rome.layer=-1", "--hparam", "v_lr=0.1", "--hparam", "kl_factor=0",
                                 "--hparam", "ft.norm_constraint=null", "--hparam", "grace.val_init=warm")
    assert result.ret == 0, result.stderr.str()


def test_constraints_hold_for_every_source_of_a_value():
    """The same declared constraints apply to family files, --hparams-file and overrides (load_hparams)."""
    rome = registry.get("rome")
    with pytest.raises(HparamsError, match=r"v_num_grad_steps=0 must be >= 1"):
        load_hparams(rome, "llama", {"v_num_grad_steps": "0"})
    with pytest.raises(HparamsError, match=r"clamp_norm_factor=nan is not a number"):
        load_hparams(rome, "llama", {"clamp_norm_factor": float("nan")})
    assert load_hparams(rome, "llama", {"v_lr": "1e-3"}).v_lr == 1e-3


def test_every_builtin_editor_declares_its_counts_and_rates():
    """Declared, not listed per editor: every step/iteration count of a built-in editor is >= 1 and every learning
    rate > 0, from its dataclass field metadata; the defaults satisfy their own constraints."""
    for name in registry.names():
        cls = registry.get(name)
        if not dataclasses.is_dataclass(cls.Hparams):
            continue
        for f in dataclasses.fields(cls.Hparams):
            if f.name in ("num_steps", "n_iter", "v_num_grad_steps"):
                assert f.metadata.get("min") == 1, (name, f.name)
            if f.name in ("lr", "v_lr", "edit_lr"):
                assert f.metadata.get("gt") == 0, (name, f.name)
        load_hparams(cls, "llama")                              # the defaults and family files pass


def _gguf(path: Path, block_count: int) -> Path:
    """A GGUF v3 header: architecture, a string array (as a tokenizer's vocabulary) before the block count."""
    def s(text: str) -> bytes:
        raw = text.encode()
        return struct.pack("<Q", len(raw)) + raw
    kv = [s("general.architecture") + struct.pack("<I", 8) + s("llama"),
          s("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 3) + s("a") + s("bb") + s("ccc"),
          s("tokenizer.ggml.scores") + struct.pack("<IIQ", 9, 6, 2) + struct.pack("<ff", 0.5, 0.25),
          s("llama.block_count") + struct.pack("<I", 4) + struct.pack("<I", block_count)]
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, len(kv)) + b"".join(kv) + b"\0" * 64)
    return path


def test_layer_count_is_read_without_the_weights(tmp_path, tiny_model_dir):
    """The GGUF header (no tensor read, no de-quantizing) and a model folder's config.json give the depth."""
    from harness.options import gguf_block_count, model_depth
    assert gguf_block_count(_gguf(tmp_path / "m.gguf", 7)) == 7
    assert model_depth(Options(model=str(tmp_path / "m.gguf"))) == 7
    assert model_depth(Options(model=str(tiny_model_dir))) == 4
    assert model_depth(Options(model=str(tmp_path / "no-such-model"))) is None      # checked after the load
    (tmp_path / "x.gguf").write_bytes(b"not gguf")
    assert gguf_block_count(tmp_path / "x.gguf") is None


def test_layer_range_on_a_gguf_model_is_checked_at_start_up(suite_dir, tmp_path):
    result = suite_dir.runpytest("-p", "no:cacheprovider", "--model", str(_gguf(tmp_path / "m.gguf", 6)),
                                 "--hparam", "rome.layer=6")
    _one_usage_error(result, "--hparam rome.layer=6: editor 'rome': layer 6 does not exist in a 6-layer model*")


def test_help_says_the_statistics_come_from_model_samples_without_a_data_dir(suite_dir):
    out = " ".join("\n".join(suite_dir.runpytest("--help").stdout.lines).split())
    stats = out[out.index("--stats-corpus"):out.index("--stats-tokens")]
    assert "else model-samples" in stats and "else builtin" not in stats
    dataset = out[out.index("--dataset=DATASET"):out.index("--cases")]
    assert all(s in dataset for s in ("qaedit", "zsre-qa", "knowedit:FILE", "QAEdit", "KnowEdit"))
