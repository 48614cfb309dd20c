"""Faults a hostile user (or a crash) can cause, reproduced on tiny random models, and the behaviour the harness
guarantees for each (docs/guarantees.md): a resumed sequential run gives the records of an unbroken run or refuses
in one line; damaged caches are detected and rebuilt; bad data is a one-line error naming file, record and field;
a prompt beyond the model's context is refused before anything is allocated."""
from __future__ import annotations

import json
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
    for save_call in (3, 1):           # fresh run dies before checkpoint 3; the resume (at 2) dies there again
        with monkeypatch.context() as m:
            _crash_at_save(m, save_call)
            with pytest.raises(Crash):
                _run_of(seq_setup, tmp_path, resume=save_call == 1).run(PhaseTimer("cpu"))
        assert _digest(lm) == digest                       # the base model is back after each crash
    run = _run_of(seq_setup, tmp_path, resume=True)
    assert len(run.journal.read_text().splitlines()) == 3  # 2 checkpointed edits + 1 journaled after
    with pytest.warns(UserWarning, match="journaled after the last checkpoint are replayed"):
        result = run.run(PhaseTimer("cpu"))
    assert result.resumed_from == 2
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
    assert result.resumed_from == 2
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
