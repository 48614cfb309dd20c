"""Faults a hostile user (or a crash) can cause, reproduced on tiny random models, and the behaviour the harness
guarantees for each (docs/guarantees.md): a resumed sequential run gives the records of an unbroken run or refuses
in one line; damaged caches are detected and rebuilt; bad data is a one-line error naming file, record and field;
a prompt beyond the model's context is refused before anything is allocated."""
from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from harness.editors import build_editor
from harness.metrics import perplexity
from harness.sequential import ConcurrentRunError, ResumeError, SequentialRun
from harness.timing import PhaseTimer

from .conftest import make_stats

N_EDITS = 4


class Crash(Exception):
    """Stands for a kill at a chosen point of a run."""


# ------------------------------------------------------------------------------------------ sequential resume

@pytest.fixture(scope="module")
def seq_setup(tiny_llama, builtin_cases, tmp_path_factory):
    """A tiny Llama, D4S (an editor with state carried across edits) and 4 cases; the records of an unbroken run."""
    from harness.data import load_texts
    texts = load_texts("builtin")[:4]
    stats = make_stats(tiny_llama, tmp_path_factory.mktemp("stats"))
    hp = ["layers=[1]", "v_num_grad_steps=4", "context_template_length_params=[[3,2]]"]
    editor = build_editor("d4s", tiny_llama, hp, stats=stats)
    cases = builtin_cases[:N_EDITS]
    ppl = lambda: perplexity(tiny_llama.model, tiny_llama.tokenizer, texts).mean_ppl  # noqa: E731
    base = ppl()
    reference = _sequential(tiny_llama, editor, cases, ppl, base, tmp_path_factory.mktemp("ref"))
    return tiny_llama, editor, cases, ppl, base, reference


def _sequential(lm, editor, cases, ppl, base, folder: Path, *, resume: bool = False) -> object:
    run = SequentialRun(lm, editor, cases, perplexity=ppl, ppl_base=base, journal_dir=folder, resume=resume)
    return run.run(PhaseTimer("cpu"))


def _run_of(setup, folder: Path, resume: bool = False) -> SequentialRun:
    lm, editor, cases, ppl, base, _ = setup
    return SequentialRun(lm, editor, cases, perplexity=ppl, ppl_base=base, journal_dir=folder, resume=resume)


def _records(result) -> tuple:
    """What a run reports, without the wall-clock seconds (they differ between any two runs)."""
    steps = [{k: v for k, v in s.items() if k != "edit_seconds"} for s in result.steps]
    return steps, result.final, result.metrics(2.0)


def _crash_at_save(monkeypatch, n: int) -> None:
    """Kill the run between the journal append and the checkpoint save of edit ``n`` (1-based)."""
    calls = {"n": 0}
    real = SequentialRun._save

    def save(self, lines, names):
        calls["n"] += 1
        if calls["n"] == n:
            raise Crash(f"killed before checkpoint {n}")
        real(self, lines, names)
    monkeypatch.setattr(SequentialRun, "_save", save)


def test_resume_after_crash_between_append_and_checkpoint(seq_setup, tmp_path, monkeypatch):
    """Two crashes between the journal append and the checkpoint save (the issue's x-values [0,1,2,2,4]): every
    resume truncates the journal back to the checkpoint, and the records equal an unbroken run's."""
    lm, reference = seq_setup[0], seq_setup[-1]
    digest = _digest(lm)
    for save_call, resume in ((3, False), (1, True)):  # a fresh run dies before checkpoint 3; the resume there too
        replay = pytest.warns(UserWarning, match="replayed") if resume else contextlib.nullcontext()
        with monkeypatch.context() as m, replay:
            _crash_at_save(m, save_call)
            with pytest.raises(Crash):
                _run_of(seq_setup, tmp_path, resume=resume).run(PhaseTimer("cpu"))
        assert _digest(lm) == digest                       # the base model is back after each crash
    run = _run_of(seq_setup, tmp_path, resume=True)
    assert len(run.journal.read_text().splitlines()) == 3  # 2 checkpointed edits + 1 journaled after
    with pytest.warns(UserWarning, match="journaled after the last checkpoint are replayed"):
        result = run.run(PhaseTimer("cpu"))
    assert result.resumed_from == result.resumed_edits == 2
    assert _records(result) == _records(reference)
    assert [n for n, _ in result.ppl_curve()] == [0, 1, 2, 3, 4]
    assert [json.loads(x)["n_edits"] for x in run.journal.read_text().splitlines()] == [1, 2, 3, 4]


def test_resume_after_lost_journal_line(seq_setup, tmp_path, monkeypatch):
    """The journal lost its last line (the checkpoint has the edit): the line is written back from the checkpoint
    instead of the edit being applied twice."""
    reference = seq_setup[-1]
    with monkeypatch.context() as m:
        _crash_at_save(m, 3)
        with pytest.raises(Crash):
            _run_of(seq_setup, tmp_path).run(PhaseTimer("cpu"))
    run = _run_of(seq_setup, tmp_path, resume=True)
    lines = run.journal.read_text().splitlines()
    run.journal.write_text(lines[0] + "\n" + lines[1][:17])          # line 2 cut mid-write, line 3 lost
    with pytest.warns(UserWarning, match="1 journal line.s. lost; restored from"):
        result = run.run(PhaseTimer("cpu"))
    assert result.resumed_from == result.resumed_edits == 2
    assert _records(result) == _records(reference)


def test_resume_refuses_a_journal_that_disagrees_with_the_checkpoint(seq_setup, tmp_path, monkeypatch):
    with monkeypatch.context() as m:
        _crash_at_save(m, 3)
        with pytest.raises(Crash):
            _run_of(seq_setup, tmp_path).run(PhaseTimer("cpu"))
    run = _run_of(seq_setup, tmp_path, resume=True)
    lines = run.journal.read_text().splitlines()
    run.journal.write_text("\n".join([lines[1], lines[0], lines[2]]) + "\n")   # interleaved by another writer
    with pytest.raises(ResumeError) as e:
        run.run(PhaseTimer("cpu"))
    msg = str(e.value)
    assert "\n" not in msg and str(run.journal) in msg and "line 1 differs" in msg and "without --resume" in msg


@pytest.mark.parametrize("damage", ["truncated", "flipped", "other-format"])
def test_damaged_checkpoint_is_a_one_line_refusal(seq_setup, tmp_path, monkeypatch, damage):
    lm = seq_setup[0]
    with monkeypatch.context() as m:
        _crash_at_save(m, 3)
        with pytest.raises(Crash):
            _run_of(seq_setup, tmp_path).run(PhaseTimer("cpu"))
    run = _run_of(seq_setup, tmp_path, resume=True)
    raw = run.checkpoint.read_bytes()
    if damage == "truncated":
        run.checkpoint.write_bytes(raw[: len(raw) // 2])
    elif damage == "flipped":                   # one weight changed, the file still unpickles
        ck = torch.load(run.checkpoint, weights_only=True)
        next(iter(ck["weights"].values()))[0, 0] += 1.0
        torch.save(ck, run.checkpoint)
    else:
        torch.save({"n_batches": 2, "weights": {}}, run.checkpoint)  # a checkpoint of the first version
    digest = _digest(lm)
    with pytest.raises(ResumeError) as e:
        run.run(PhaseTimer("cpu"))
    msg = str(e.value)
    assert "\n" not in msg and str(run.checkpoint) in msg and "without --resume" in msg
    assert len(msg) < 400 and _digest(lm) == digest


def test_concurrent_identical_run_is_refused(seq_setup, tmp_path):
    """A second writer of the same journal is refused in one line naming the live one; once that process is gone
    (here: killed), its lock is released by the kernel and a run proceeds."""
    run = _run_of(seq_setup, tmp_path)
    tmp_path.mkdir(exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, sys.argv[1]); from pathlib import Path; "
        "from harness.sequential import JournalLock; JournalLock(Path(sys.argv[2])).acquire(); "
        "print('locked', flush=True); time.sleep(60)"), str(Path(__file__).parents[1]), str(run.journal)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConcurrentRunError) as e:
            run.run(PhaseTimer("cpu"))
        msg = str(e.value)
        assert "\n" not in msg and str(run.journal) in msg and f"pid {holder.pid}" in msg and "--report-dir" in msg
    finally:
        holder.kill()
        holder.wait()
    result = run.run(PhaseTimer("cpu"))
    assert _records(result) == _records(seq_setup[-1])


def test_sequential_restore_is_checked_by_digest(seq_setup, tmp_path, monkeypatch):
    """The restore at the end of a sequential run is verified like a single edit's: a restore that leaves the
    weights changed is an error, not a silently edited model for the next test."""
    from harness.models.snapshot import WeightSnapshot
    lm, editor = seq_setup[0], seq_setup[1]
    digest = _digest(lm)
    mine = WeightSnapshot(lm.model, editor.edited_parameters(lm))
    real_restore = WeightSnapshot.restore
    monkeypatch.setattr(WeightSnapshot, "restore", lambda self: None)      # a restore that does nothing
    try:
        with pytest.raises(RuntimeError, match="not bit-exact"):
            _run_of(seq_setup, tmp_path).run(PhaseTimer("cpu"))
    finally:
        real_restore(mine)
    assert _digest(lm) == digest


def _digest(lm) -> str:
    from harness.models import param_digest
    return param_digest(lm.model)


# ------------------------------------------------------------------------------- cached de-quantized weights

@pytest.fixture
def fake_gguf(tmp_path, tiny_llama, monkeypatch):
    """A stand-in .gguf whose "de-quantization" saves the tiny Llama: the cache machinery runs for real (manifest,
    verification, rebuild, scratch folders) without a real GGUF. Yields (gguf path, cache dir, build counter)."""
    from harness.models import loading
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF stand-in")
    builds = {"n": 0}

    def dequantize(_gguf, out):
        builds["n"] += 1
        tiny_llama.model.save_pretrained(out)
        tiny_llama.tokenizer.save_pretrained(out)
    monkeypatch.setattr(loading, "_dequantize", dequantize)
    return gguf, tmp_path / "cache", builds


def _load(gguf, cache):
    from harness.models import load_model
    return load_model(str(gguf), device="cpu", cache_dir=cache)


def _model_folders(cache: Path) -> list[str]:
    return sorted(p.name for p in (cache / "models").iterdir())


def _zero_middle(path: Path, n: int = 4096) -> None:
    """Overwrite ``n`` bytes in the middle of a file with zeros (same size, same mtime class of damage)."""
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        f.write(b"\0" * n)


@pytest.mark.parametrize("damage, reason", [
    ("zeroed", "does not match the SHA-256"),
    ("truncated", "truncated"),
    ("no-config", "config.json is missing"),
    ("no-manifest", "no harness-manifest.json"),
])
def test_damaged_cached_weights_are_rebuilt(fake_gguf, damage, reason):
    from harness.models import param_digest
    from harness.models.loading import MANIFEST, CacheWarning
    gguf, cache, builds = fake_gguf
    digest = param_digest(_load(gguf, cache).model)
    (folder,) = (cache / "models").iterdir()
    assert (folder / MANIFEST).is_file() and builds["n"] == 1
    weights = folder / "model.safetensors"
    if damage == "zeroed":
        _zero_middle(weights)
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:-1000])
    elif damage == "no-config":
        (folder / "config.json").unlink()
    else:
        (folder / MANIFEST).unlink()
    with pytest.warns(CacheWarning, match=reason):
        lm = _load(gguf, cache)
    assert builds["n"] == 2 and param_digest(lm.model) == digest
    assert _model_folders(cache) == [folder.name]          # no scratch or moved-aside folder left behind
    _load(gguf, cache)
    assert builds["n"] == 2                                # the rebuilt folder verifies


def test_failed_build_leaves_no_scratch_folder(fake_gguf, monkeypatch):
    """A build that dies half-way (disk full, interrupted) removes its scratch folder; so does the next build for
    the scratch folder of a process that was killed."""
    from harness.models import loading
    gguf, cache, _ = fake_gguf
    good = loading._dequantize

    def half(gguf_, out):
        good(gguf_, out)
        raise OSError("No space left on device")
    monkeypatch.setattr(loading, "_dequantize", half)
    with pytest.raises(OSError, match="No space"):
        _load(gguf, cache)
    assert _model_folders(cache) == []
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    target = f"tiny-{loading._file_digest(gguf)}"
    stale = cache / "models" / f"{target}.tmp-{socket.gethostname()}-{dead.pid}-abcd1234"    # a killed build's
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    monkeypatch.setattr(loading, "_dequantize", good)
    _load(gguf, cache)
    assert _model_folders(cache) == [target]


def test_nan_weights_are_a_load_error_naming_the_file(tiny_llama, tmp_path):
    """NaN weights are a one-line load error naming the model, the weight and the file, not a "collapse" blamed
    on the editor."""
    from harness.models import ModelLoadError, load_model
    name = "model.layers.2.mlp.down_proj.weight"
    w = dict(tiny_llama.model.named_parameters())[name]
    saved = w.detach().clone()
    with torch.no_grad():
        w[3, 5] = float("nan")
    try:
        tiny_llama.model.save_pretrained(tmp_path)
    finally:
        with torch.no_grad():
            w.copy_(saved)
    tiny_llama.tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError) as e:
        load_model(str(tmp_path), device="cpu", cache_dir=tmp_path / "cache")
    msg = str(e.value)
    assert "\n" not in msg and name in msg and str(tmp_path / "model.safetensors") in msg and "1 NaN/inf" in msg


def test_fingerprint_sees_damage_anywhere(tiny_llama):
    """The fingerprint that keys the statistics cache samples every weight tensor (it used to sample five)."""
    from harness.models.loading import fingerprint
    before = fingerprint(tiny_llama.model)
    w = tiny_llama.model.model.layers[2].mlp.down_proj.weight
    saved = w.detach().clone()
    with torch.no_grad():
        w[:, : w.shape[1] // 2] = 0           # half of one middle tensor zeroed
    try:
        assert fingerprint(tiny_llama.model) != before
    finally:
        with torch.no_grad():
            w.copy_(saved)
    assert fingerprint(tiny_llama.model) == before


# -------------------------------------------------------------------------------------- statistics cache

@pytest.mark.parametrize("damage, reason", [
    ("truncated", "unreadable"),
    ("garbage", "unreadable"),
    ("flipped", "does not match its SHA-256"),
    ("foreign", "of another model, layer, corpus or token count"),
    ("old-format", "of an older harness version"),
])
def test_damaged_statistics_cache_is_recomputed(tiny_gpt2, tmp_path, damage, reason):
    from harness.models.loading import CacheWarning
    stats = make_stats(tiny_gpt2, tmp_path, n_tokens=1500)
    c1 = stats.second_moment(1).clone()
    path = stats.path(1)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:300])
    elif damage == "garbage":
        path.write_bytes(b"\x80\x04not a pickle at all" * 20)
    elif damage == "flipped":
        saved = torch.load(path, weights_only=True)
        saved["mom2"][0, 0] += 1.0
        torch.save(saved, path)
    elif damage == "foreign":                          # layer 2's file copied over layer 1's
        stats.second_moment(2)
        path.write_bytes(stats.path(2).read_bytes())
    else:
        torch.save({"mom2": c1 * 2, "count": 1, "corpus": "builtin"}, path)
    fresh = make_stats(tiny_gpt2, tmp_path, n_tokens=1500)
    with pytest.warns(CacheWarning, match=reason) as record:
        c2 = fresh.second_moment(1)
    assert len(record) == 1 and "\n" not in str(record[0].message) and str(path) in str(record[0].message)
    assert torch.equal(c1, c2)
    again = make_stats(tiny_gpt2, tmp_path, n_tokens=1500)
    assert torch.equal(again.second_moment(1), c1)       # the rewritten file is whole and of this key


def test_statistics_cache_is_keyed_by_tokens_and_corpus(tiny_gpt2, tmp_path):
    a = make_stats(tiny_gpt2, tmp_path, n_tokens=1500)
    b = make_stats(tiny_gpt2, tmp_path, n_tokens=1000)
    assert a.path(1) != b.path(1)
    assert a.cache_key(1) != b.cache_key(1)
    assert a.cache_key(1)["module"] == tiny_gpt2.adapter.mlp_name(1) and a.cache_key(1)["layer"] == 1


# ------------------------------------------------------------------------------------------------ bad data

def _rome(case_id, subject="Angola", **rewrite) -> dict:
    rr = {"prompt": "{} is located in the continent of", "subject": subject, "relation_id": "P30",
          "target_new": {"str": "Antarctica"}, "target_true": {"str": "Africa"}, **rewrite}
    return {"case_id": case_id, "requested_rewrite": rr, "paraphrase_prompts": ["Angola lies in"],
            "neighborhood_prompts": ["Ghana is in"]}


def _write(path: Path, records) -> Path:
    path.write_text(json.dumps(records))
    return path


@pytest.mark.parametrize("subject", [["Angola", "Ghana"], ["Angola"], 7, {"str": "Angola"}])
def test_subject_of_a_wrong_type_is_a_one_line_error(tmp_path, subject):
    """A subject given as a list used to edit its first element silently; any non-string is now an error naming
    file, record and field (and --skip-invalid skips it like any invalid record)."""
    from harness.data import DataError, load_cases
    path = _write(tmp_path / "cf.json", [_rome(1), _rome(2, subject=subject)])
    with pytest.raises(DataError) as e:
        load_cases(str(path))
    msg = str(e.value)
    assert "\n" not in msg and "cf.json record 1 (case_id 2)" in msg
    assert "field 'requested_rewrite.subject' should be a string, got" in msg and "--skip-invalid" in msg


@pytest.mark.parametrize("record, field", [
    ({"prompt": "Paris is in", "subject": ["Paris"], "target_new": "Italy"}, "subject"),
    ({"prompt": "Paris is in", "subject": "Paris", "target_new": {"str": "Italy"}}, "target_new"),
    ({"prompt": "Paris is in", "subject": "Paris", "target_new": "Italy", "ground_truth": [True]}, "ground_truth"),
    ({"src": ["Where is Paris?"], "subject": "Paris", "alt": "Italy"}, "src"),
])
def test_wrong_types_in_other_formats(tmp_path, record, field):
    from harness.data import DataError, load_cases
    with pytest.raises(DataError, match=rf"x.json record 0: field '{field}' should be a string"):
        load_cases(str(_write(tmp_path / "x.json", [record])))


def test_an_edit_case_built_in_code_is_checked_too():
    from harness.data import EditCase
    with pytest.raises(TypeError, match="subject should be a non-empty string, got list"):
        EditCase(case_id="c", subject=["Angola"], prompt="{} is in", target_new="Asia")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="has no '{}' for the subject"):
        EditCase(case_id="c", subject="Angola", prompt="Angola is in", target_new="Asia")


def test_skip_invalid_reports_what_it_skipped(tmp_path):
    """--skip-invalid returns the skipped records (file, index, id, field, reason) with the cases, and warns once
    per file with the count."""
    from harness.data import LoadedCases, SkippedRecordsWarning, load_cases
    records = [_rome(1), _rome(2, subject=["A", "B"]), _rome(3), "not a record", _rome(5, prompt="no slot")]
    path = _write(tmp_path / "cf.json", records)
    with pytest.warns(SkippedRecordsWarning, match=r"cf.json: skipped 3 invalid record\(s\)") as w:
        cases = load_cases(str(path), skip_invalid=True)
    assert len(w) == 1
    assert isinstance(cases, LoadedCases) and [c.case_id for c in cases] == ["1", "3"]
    assert [(s.file, s.index, s.record_id, s.field) for s in cases.skipped] == [
        ("cf.json", 1, "case_id 2", "requested_rewrite.subject"), ("cf.json", 3, None, "<record>"),
        ("cf.json", 4, "case_id 5", "requested_rewrite.prompt")]
    assert all("\n" not in s.reason and s.reason.startswith("cf.json record") for s in cases.skipped)
    assert json.loads(json.dumps([s.to_dict() for s in cases.skipped]))[0]["field"] == "requested_rewrite.subject"
    assert cases.skip_summary().startswith("--skip-invalid left out 3 invalid record(s) of cf.json (first: ")
    strict = load_cases(str(_write(tmp_path / "ok.json", [_rome(1)])))
    assert strict.skipped == [] and strict.skip_summary() is None


@pytest.mark.parametrize("records, needle", [
    ([_rome(1, subject=["A"]), _rome(2, subject=3)], "all 2 record(s) read are invalid"),
    ([], "contains no records"),
])
def test_all_invalid_or_empty_file_is_an_error(tmp_path, records, needle):
    """An all-invalid file under --skip-invalid used to give zero cases, exit 0 and no report."""
    from harness.data import DataError, load_counterfact_rome
    path = _write(tmp_path / "cf.json", records)
    with pytest.raises(DataError) as e:
        load_counterfact_rome(path, skip_invalid=True)
    assert "\n" not in str(e.value) and "cf.json" in str(e.value) and needle in str(e.value)


# ----------------------------------------------------------------------------------------- huge prompts

def test_huge_prompt_is_refused_before_any_batch(tiny_tokenizer, monkeypatch):
    """A 10k-token prompt (which once padded a batch until 22 GB were exhausted) raises PromptTooLong at once, on a
    model with a small context, before a batch is padded or a forward pass runs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from harness.metrics import scoring
    from harness.tokens import PromptTooLong
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                         max_position_embeddings=64)).eval()
    padded = []
    monkeypatch.setattr(scoring, "pad_batch", lambda *a, **k: padded.append(a) or pytest.fail("batch padded"))
    huge = "the " * 10_000
    assert len(tiny_tokenizer(huge).input_ids) >= 10_000
    t0 = time.perf_counter()
    with pytest.raises(PromptTooLong) as e:
        scoring.score_targets(model, tiny_tokenizer, ["Paris is in", huge], ["France", "Italy"])
    assert time.perf_counter() - t0 < 5 and not padded
    msg = str(e.value)
    assert "\n" not in msg and "more than the model's context of 64" in msg
