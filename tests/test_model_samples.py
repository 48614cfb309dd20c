"""The key statistics' default corpus without a data dir: text sampled from the model, with the keys summed while it
is sampled (no second pass), cached with its token ids and verified when read back; the statistics cache keyed by
the corpus's content; progress reported past pytest's capture."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

import harness.data.corpus as corpus
from harness.data.corpus import MODEL_SAMPLES, model_samples
from harness.models.loading import CacheWarning
from harness.progress import Progress
from harness.stats import SAMPLES_PER_DIM, LayerStats, default_tokens

pytest_plugins = ["pytester"]
SETTINGS = {"seq_len": 40, "batch_size": 4}


@pytest.fixture
def short_samples(monkeypatch):
    monkeypatch.setitem(corpus.SAMPLE_SETTINGS, "seq_len", 40)
    monkeypatch.setitem(corpus.SAMPLE_SETTINGS, "batch_size", 4)


def test_samples_are_whole_sequences_of_the_ids_run_and_are_cached(tiny_llama, tmp_path):
    s = model_samples(tiny_llama, 300, tmp_path, SETTINGS)
    assert len(s.ids) == 8 and all(len(i) == 40 for i in s.ids) and s.n_tokens == 320    # ceil(300 / 40) sequences
    assert len(set(map(tuple, s.ids))) == len(s.ids) and len(s.texts) == len(s.ids)
    (path,) = tmp_path.glob("corpus/*/model-samples-*.json")
    saved = json.loads(path.read_text())
    assert saved["ids"] == s.ids and saved["sha256"] == s.digest() and saved["settings"]["n_tokens"] == 300
    again = model_samples(tiny_llama, 300, tmp_path, SETTINGS)
    assert again.ids == s.ids                                                   # read back, not sampled again
    other = model_samples(tiny_llama, 300, tmp_path, {**SETTINGS, "seed": 1})
    assert other.ids != s.ids


@pytest.mark.parametrize("damage", ["altered", "empty", "garbage"])
def test_a_damaged_samples_cache_is_sampled_again_with_a_warning(tiny_llama, tmp_path, damage):
    s = model_samples(tiny_llama, 120, tmp_path, SETTINGS)
    (path,) = tmp_path.glob("corpus/*/model-samples-*.json")
    saved = json.loads(path.read_text())
    if damage == "altered":
        saved["ids"][0][5] = (saved["ids"][0][5] + 1) % 100
        path.write_text(json.dumps(saved))
    elif damage == "empty":
        path.write_text(json.dumps({**saved, "ids": [], "texts": []}))
    else:
        path.write_text("{not json")
    with pytest.warns(CacheWarning, match="sampling it again"):
        again = model_samples(tiny_llama, 120, tmp_path, SETTINGS)
    assert again.ids == s.ids                                                   # same seed: the same text
    assert json.loads(path.read_text())["sha256"] == s.digest()                 # and the file is whole again


def test_keys_summed_while_sampling_equal_a_pass_over_the_sampled_ids(tiny_llama, tmp_path, short_samples):
    sampled = LayerStats(tiny_llama, lambda: [], MODEL_SAMPLES, n_tokens=200, cache_dir=tmp_path, progress=False)
    C_during = sampled.second_moments([1, 2])                  # sampled now: summed by hooks during sampling
    assert sampled.provenance == {"corpus": MODEL_SAMPLES, "tokens_requested": 200, "tokens_used": 200}
    for f in tmp_path.glob("stats/**/*.pt"):
        f.unlink()                                             # the samples stay cached: a pass over their ids
    reread = LayerStats(tiny_llama, lambda: [], MODEL_SAMPLES, n_tokens=200, cache_dir=tmp_path, progress=False)
    C_after = reread.second_moments([1, 2])
    for layer in (1, 2):
        assert C_during[layer].shape == (128, 128)
        torch.testing.assert_close(C_during[layer], C_after[layer], rtol=1e-5, atol=1e-6)
    k = reread.second_moment(3)                                 # a layer asked for later: the cached ids, once
    assert k.shape == (128, 128)


def test_default_token_count_is_twenty_times_d_in_for_model_samples(tiny_llama):
    assert default_tokens(tiny_llama, MODEL_SAMPLES) == SAMPLES_PER_DIM * 128
    assert default_tokens(tiny_llama, "wikitext") == 100_000
    assert LayerStats(tiny_llama, lambda: [], MODEL_SAMPLES).n_tokens == 2560


def test_statistics_cache_is_keyed_by_the_corpus_content(tiny_llama, tmp_path):
    f = tmp_path / "corpus.txt"
    f.write_text("The river runs north past the old mill.\n\nA second paragraph of general text here.")
    first = LayerStats(tiny_llama, lambda: [f.read_text()], str(f), n_tokens=20, cache_dir=tmp_path, progress=False)
    C1 = first.second_moment(1)
    f.write_text("Completely different words now fill this file, about ships and the sea.")
    edited = LayerStats(tiny_llama, lambda: [f.read_text()], str(f), n_tokens=20, cache_dir=tmp_path, progress=False)
    C2 = edited.second_moment(1)
    assert edited.last_compute_seconds is not None             # recomputed, not the old file's statistics
    assert not torch.equal(C1, C2)
    same = LayerStats(tiny_llama, lambda: [f.read_text()], str(f), n_tokens=20, cache_dir=tmp_path, progress=False)
    same.second_moment(1)
    assert same.last_compute_seconds is None                   # unchanged content: from the cache


def test_progress_lines_without_a_terminal(tiny_llama, tmp_path, short_samples):
    import io
    out = io.StringIO()
    stats = LayerStats(tiny_llama, lambda: [], MODEL_SAMPLES, n_tokens=80, cache_dir=tmp_path,
                       progress=Progress(out, bars=False))
    stats.second_moment(1)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("harness: sampling text from the model for key statistics (80 tok)")
    assert lines[1].startswith("harness: sampling text from the model for key statistics: done in ")
    assert lines[1].endswith("tok/s") and len(lines) == 2


def test_progress_reaches_the_terminal_despite_capture(pytester, tiny_model_dir):
    """A suite run with pytest's default capture: the long steps' lines are on the terminal."""
    from pathlib import Path
    suites = Path(__file__).resolve().parents[1] / "suites"
    result = pytester.runpytest_subprocess(
        str(suites / "test_single_edit.py"), "--model", str(tiny_model_dir), "--editor", "rome", "--cases", "1",
        "--dataset", "builtin", "--hparam", "rome.layer=1", "--hparam", "v_num_grad_steps=2", "--hparam",
        "context_template_length_params=[[3,2]]", "--min-efficacy", "0", "--stats-corpus",
        "model-samples", "--stats-tokens", "64", "--cache-dir", str(pytester.path / "cache"),
        "--report-dir", str(pytester.path / "reports"), "-p", "no:cacheprovider")
    out = result.stdout.str()
    assert result.ret == 0, out
    for step in ("loading model", "sampling text from the model for key statistics (256 tok)",   # one whole sequence
                 "perplexity of the unedited model"):
        assert f"harness: {step}" in out, step


def test_processes_sharing_a_cache_sample_once(tiny_llama, tmp_path):
    """xdist workers with one cache: while one process holds the sampling lock, another waits, then reads its file
    instead of sampling the same text again."""
    import fcntl
    import threading

    first = model_samples(tiny_llama, 120, tmp_path / "warm", SETTINGS)        # the text the other process writes
    key = first.key
    path = corpus._samples_path(tmp_path, key)
    path.parent.mkdir(parents=True)
    lock = open(path.with_name(path.name + ".lock"), "a")
    fcntl.flock(lock, fcntl.LOCK_EX)                                            # "another process" is sampling
    sampled = []
    monkey = corpus.sample_model_text
    corpus.sample_model_text = lambda *a, **k: sampled.append(1) or monkey(*a, **k)
    try:
        out, io_lines = [], []
        waiter = threading.Thread(target=lambda: out.append(
            model_samples(tiny_llama, 120, tmp_path, SETTINGS, progress=Progress(_Lines(io_lines), bars=False))))
        waiter.start()
        waiter.join(timeout=1.0)
        assert waiter.is_alive()                                                # it waits for the lock
        corpus.write_model_samples(path, first)                                 # the other process finishes
        fcntl.flock(lock, fcntl.LOCK_UN)
        waiter.join(timeout=30)
    finally:
        corpus.sample_model_text = monkey
        lock.close()
    assert not sampled and len(out) == 1 and out[0].ids == first.ids            # read, not sampled again
    assert any("waiting for another process" in line for line in io_lines)


class _Lines:
    def __init__(self, sink):
        self.sink = sink

    def write(self, text):
        self.sink.append(text)

    def flush(self):
        pass


def test_a_long_step_says_how_far_it_is_now_and_then(monkeypatch):
    """Without a terminal a step of hours (a 1,000-edit stream) prints, besides its start and end lines, a line with
    units done, rate and ETA at most every ``every_s`` seconds; a resumed step counts the units done before."""
    import io

    from harness import progress as progress_module
    clock = iter([0.0, 10.0, 70.0, 80.0, 200.0, 200.0])
    monkeypatch.setattr(progress_module.time, "perf_counter", lambda: next(clock))
    out = io.StringIO()
    with Progress(out, bars=False).step("sequential memit", total=1000, unit="edits", initial=100,
                                        every_s=60.0) as bar:
        for _ in range(4):
            bar.update(100)
    lines = out.getvalue().splitlines()
    assert lines[0] == "harness: sequential memit (1,000 edits): 100 done before ..."
    # t=10: 100 edits, under a minute since the start: quiet; t=70: 200 edits in 70 s -> a line; t=80: quiet
    assert lines[1] == "harness: sequential memit: 300/1,000 edits (171.4 edits/min, about 4 min 5 s left)"
    assert lines[2] == "harness: sequential memit: 500/1,000 edits (120.0 edits/min, about 4 min 10 s left)"
    assert lines[3] == "harness: sequential memit: done in 3 min 20 s, 120.0 edits/min" and len(lines) == 4
