"""Latency of one edit + restore (ROME, FT) on the tiny random Llama of the unit tests (pytest-benchmark).

Not part of ``pytest tests`` (``testpaths = ["tests"]``); run it by path, with one torch thread so numbers compare
across runs and machines::

    OMP_NUM_THREADS=1 pytest benchmarks/test_edit_latency.py

Each benchmark times ``editor.apply`` (one case) followed by ``edit.restore()`` and ``editor.reset()``, 5 rounds of
one call, after 1 untimed warm-up round (``benchmark.pedantic(..., rounds=5, warmup_rounds=1)``): the warm-up pays
for what the editor builds once per model and keeps (ROME's context templates, the layer's key statistics), so the
timed rounds are the per-edit cost. After the rounds the weights must be bit-exact as before.

Store a run as the reference, then compare later runs against it (fail when the mean is more than 25 % slower)::

    OMP_NUM_THREADS=1 pytest benchmarks/test_edit_latency.py --benchmark-autosave
    OMP_NUM_THREADS=1 pytest benchmarks/test_edit_latency.py --benchmark-compare --benchmark-compare-fail=mean:25%

Saved runs go to ``.benchmarks/<platform>/NNNN_*.json`` (e.g. ``Linux-CPython-3.11-64bit``, git-ignored);
``--benchmark-compare`` takes the latest saved one, ``--benchmark-compare=0001`` a given one, and
``pytest-benchmark compare`` lists or tabulates them.
Compare only runs of the same machine and thread count (``extra_info`` records the threads and torch version).
"""
from __future__ import annotations

import pytest
import torch

from harness.editors import build_editor
from harness.models import param_digest

# the unit tests' tiny model and built-in cases, reused as fixtures: tests/conftest.py is not a conftest of this
# folder, so its fixtures are imported (pytest registers fixtures found in a test module's namespace)
from tests.conftest import TINY_HPARAMS, builtin_cases, make_stats, tiny_llama, tiny_tokenizer  # noqa: F401

ROUNDS, WARMUP_ROUNDS = 5, 1


@pytest.fixture(scope="module")
def stats(tiny_llama, tmp_path_factory):
    return make_stats(tiny_llama, tmp_path_factory.mktemp("latency-stats"))


@pytest.mark.parametrize("name", ["rome", "ft"])
def test_edit_and_restore_latency(benchmark, name, tiny_llama, builtin_cases, stats):
    lm, case = tiny_llama, builtin_cases[0]
    editor = build_editor(name, lm, TINY_HPARAMS[name], stats=stats)
    before = param_digest(lm.model)
    changed = []

    def edit_and_restore():
        edit = editor.apply(lm, [case])
        changed.append(bool(edit.changed_parameters))
        edit.restore()
        editor.reset()

    benchmark.group = "edit + restore (tiny llama, 1 case)"
    benchmark.extra_info.update({"editor": name, "case_id": case.case_id, "model": lm.identity.get("name"),
                                 "n_params": lm.identity.get("n_params"), "torch": str(torch.__version__),
                                 "torch_threads": torch.get_num_threads()})
    benchmark.pedantic(edit_and_restore, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS, iterations=1)

    assert changed == [True] * (ROUNDS + WARMUP_ROUNDS)      # every call really edited something
    assert param_digest(lm.model) == before                  # and every restore was bit-exact
    assert benchmark.stats.stats.rounds == ROUNDS
