"""Sharding (harness/sharding.py): the assignment is a partition, stable (independent of collection order),
keeps groups together and balances by count or recorded durations; the plugin selects, tags and refuses bad
input; under pytest-xdist the selection is the same and the tags reach the controller."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness import options
from harness.sharding import ShardSpec, assign, load_durations, portable_id, stable_hash

pytest_plugins = ["pytester"]

DUMMY = """
import pytest

@pytest.mark.parametrize("i", range(5))
def test_single(editor_name, i):
    pass

@pytest.mark.shard_group("stream")
@pytest.mark.parametrize("step", range(3))
def test_stream(editor_name, step):
    pass
"""
# the same tests, defined and parametrized in another order
DUMMY_REORDERED = """
import pytest

@pytest.mark.shard_group("stream")
@pytest.mark.parametrize("step", [2, 0, 1])
def test_stream(editor_name, step):
    pass

@pytest.mark.parametrize("i", [4, 3, 2, 1, 0])
def test_single(editor_name, i):
    pass
"""
# the dummy tests take editor_name from the harness plugin (--editor); they record nothing, so no run JSON is
# written: this conftest saves the tags the run writer would store
CONFTEST = """
import json
from harness.sharding import shard_tags

def pytest_sessionfinish(session):
    if not hasattr(session.config, "workerinput"):
        with open("tags.json", "w") as f:
            json.dump(shard_tags(session.config), f)
"""
PLUGINS = ("-p", "no:cacheprovider", "--editor", "rome", "--editor", "memit")


# --- the assignment -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,spec", [("1/1", (1, 1)), ("2/3", (2, 3)), ("3/3", (3, 3))])
def test_shard_option_parses(text, spec):
    assert options.shard(text) == spec and str(ShardSpec(*spec)) == text


@pytest.mark.parametrize("text", ["0/3", "4/3", "1/0", "3", "a/b", "1/2/3"])
def test_shard_option_refuses(text):
    with pytest.raises(options.OptionError, match=r"^(expected I/N such as 1/3|I must be between 1 and N)"):
        options.shard(text)


def test_portable_id_and_stable_hash():
    assert portable_id("suites/test_x.py::test_y[rome-c1]") == "test_x.py::test_y[rome-c1]"
    assert portable_id("../../work/suites/test_x.py::test_y") == "test_x.py::test_y"
    assert stable_hash("a") == int.from_bytes(bytes.fromhex("86f7e437faa5a7fc"), "big")   # sha1("a")[:8]


def test_assignment_is_the_same_in_every_process():
    """Python salts str hashes per process (PYTHONHASHSEED); the assignment must not notice."""
    code = ("import json; from harness.sharding import assign; "
            "print(json.dumps(assign({f'test_x.py::t[{i}]': [f'test_x.py::t[{i}]'] for i in range(40)}, 3)))")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    assert len(outs) == 1 and len(json.loads(outs.pop())) == 40


groups_strategy = st.dictionaries(st.text(min_size=1, max_size=12), st.integers(1, 4), min_size=1, max_size=40)


def _groups(sizes: dict[str, int]) -> dict[str, list[str]]:
    return {k: [f"{k}::t{j}" for j in range(n)] for k, n in sizes.items()}


@settings(max_examples=60, deadline=None)
@given(groups_strategy, st.integers(1, 6), st.randoms(use_true_random=False))
def test_assignment_is_a_stable_partition(sizes, count, rnd):
    groups = _groups(sizes)
    where = assign(groups, count)
    assert set(where) == set(groups) and set(where.values()) <= set(range(1, count + 1))
    shuffled = list(groups.items())
    rnd.shuffle(shuffled)
    assert assign(dict(shuffled), count) == where          # collection order does not matter
    loads = [sum(len(groups[k]) for k, s in where.items() if s == i) for i in range(1, count + 1)]
    # greedy list scheduling: no shard exceeds the mean by more than the largest group
    assert max(loads) <= sum(loads) / count + max(sizes.values())
    if max(sizes.values()) == 1:
        assert max(loads) - min(loads) <= 1               # single tests: by count, within one test


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=8), st.floats(0.1, 100), min_size=2, max_size=30),
       st.integers(2, 5))
def test_duration_balance_bound(durations, count):
    groups = {k: [k] for k in durations}
    where = assign(groups, count, durations)
    loads = [sum(durations[k] for k, s in where.items() if s == i) for i in range(1, count + 1)]
    assert max(loads) <= sum(loads) / count + max(durations.values()) + 1e-9


def test_durations_beat_count_on_a_skewed_suite():
    # one slow test (8 s) and eight fast ones (1 s): by count each shard gets 4-5 tests, one of them 12 s long;
    # by duration the slow test runs alone against the eight fast ones (8 s each)
    groups = {"slow": ["slow"], **{f"fast{i}": [f"fast{i}"] for i in range(8)}}
    durations = {"slow": 8.0, **{f"fast{i}": 1.0 for i in range(8)}}

    def worst(where):
        return max(sum(durations[k] for k, s in where.items() if s == i) for i in (1, 2))
    assert worst(assign(groups, 2, durations)) == 8.0
    assert worst(assign(groups, 2)) > 8.0
    # a test that has no recorded duration counts the mean of the known ones
    mean = {f"fast{i}": 4.5 for i in range(1, 8)}
    assert assign(groups, 2, {"slow": 8.0, "fast0": 1.0}) == assign(groups, 2, {"slow": 8.0, "fast0": 1.0, **mean})


def test_load_durations(tmp_path):
    a = tmp_path / "a.json"
    a.write_text(json.dumps({"records": [
        {"nodeid": "suites/test_x.py::t[1]", "timings": {"edit": 2.0, "evaluate": 1.0}},
        {"nodeid": "suites/test_x.py::t[2]", "duration_s": 5.0, "timings": {"edit": 1.0}},
        {"nodeid": "suites/test_x.py::t[3]", "timings": {}}]}))
    b = tmp_path / "b.json"
    b.write_text(json.dumps({"records": [{"nodeid": "other/test_x.py::t[1]", "timings": {"edit": 5.0}}]}))
    assert load_durations([a, b]) == {"test_x.py::t[1]": 4.0, "test_x.py::t[2]": 5.0}
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ValueError, match=r"--shard-durations .*bad.json: not a readable run JSON"):
        load_durations([bad])


# --- the plugin ---------------------------------------------------------------------------------------------
def _selected(pytester, *args) -> list[str]:
    result = pytester.runpytest(*PLUGINS, "--collect-only", "-q", *args)
    assert result.ret == 0, result.stdout.str()
    return [ln for ln in result.stdout.lines if "::" in ln]


def test_shards_partition_the_collection_and_keep_groups(pytester):
    pytester.makepyfile(test_dummy=DUMMY)
    pytester.makeconftest(CONFTEST)
    everything = _selected(pytester)
    assert len(everything) == 16
    shards = [_selected(pytester, "--shard", f"{i}/3") for i in (1, 2, 3)]
    flat = [n for s in shards for n in s]
    assert sorted(flat) == sorted(everything)                       # a partition: every test once
    for editor in ("rome", "memit"):                                # one editor's stream in one shard
        stream = {i for i, s in enumerate(shards) for n in s if n.startswith(f"test_dummy.py::test_stream[{editor}")}
        assert len(stream) == 1
    assert max(map(len, shards)) - min(map(len, shards)) <= 3       # by count, within one group
    # -k deselects first; the shards split what is left
    ks = [_selected(pytester, "-k", "rome", "--shard", f"{i}/2") for i in (1, 2)]
    assert sorted(ks[0] + ks[1]) == sorted(n for n in everything if "rome" in n)


def test_assignment_does_not_depend_on_collection_order(pytester):
    pytester.makepyfile(test_dummy=DUMMY)
    pytester.makeconftest(CONFTEST)
    before = [sorted(_selected(pytester, "--shard", f"{i}/3")) for i in (1, 2, 3)]
    pytester.makepyfile(test_dummy=DUMMY_REORDERED)
    after = [sorted(_selected(pytester, "--shard", f"{i}/3")) for i in (1, 2, 3)]
    assert before == after


def test_durations_file_balances_the_shards(pytester):
    pytester.makepyfile(test_dummy=DUMMY)
    pytester.makeconftest(CONFTEST)
    slow = "test_dummy.py::test_single[rome-0]"
    runs = pytester.path / "earlier.json"
    runs.write_text(json.dumps({"records": [{"nodeid": slow, "duration_s": 100.0}] + [
        {"nodeid": n, "duration_s": 1.0} for n in _selected(pytester) if n != slow]}))
    shards = [_selected(pytester, "--shard", f"{i}/2", "--shard-durations", str(runs)) for i in (1, 2)]
    alone = next(s for s in shards if slow in s)
    assert len(alone) == 1                          # the 100 s test outweighs the other 15 together
    result = pytester.runpytest(*PLUGINS, "--shard", "1/2", "--shard-durations",
                                str(runs), "--collect-only")
    result.stdout.fnmatch_lines(["shard 1/2 of sweep auto-*: * of 16 tests, balanced by durations (16 of 16 tests timed)"])


@pytest.mark.parametrize("args,message", [
    (["--shard", "0/3"], "*--shard 0/3: I must be between 1 and N*"),
    (["--shard", "two"], "*--shard two: expected I/N such as 1/3*"),
    (["--shard", "1/2", "--shard-durations", "nope.json"], "*--shard-durations nope.json: no such file*"),
])
def test_bad_shard_options_are_usage_errors(pytester, args, message):
    pytester.makepyfile(test_dummy=DUMMY)
    pytester.makeconftest(CONFTEST)
    result = pytester.runpytest(*PLUGINS, *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


def test_tags_for_the_run_json(pytester):
    pytester.makepyfile(test_dummy=DUMMY)
    pytester.makeconftest(CONFTEST)
    result = pytester.runpytest(*PLUGINS, "--shard", "2/3", "--sweep-id", "sw1")
    assert result.ret == 0
    tags = json.loads((pytester.path / "tags.json").read_text())
    assert tags["sweep_id"] == "sw1" and (tags["index"], tags["count"], tags["collected"]) == (2, 3, 16)
    assert sum(tags["sizes"]) == 16 and tags["sizes"][1] == len(tags["selected"])
    assert tags["balanced_by"] == "count" and len(tags["harness_commit"]) >= 7
    # without --sweep-id every shard derives the same id from the collected set and N
    pytester.runpytest(*PLUGINS, "--shard", "1/3")
    auto1 = json.loads((pytester.path / "tags.json").read_text())["sweep_id"]
    pytester.runpytest(*PLUGINS, "--shard", "3/3")
    assert json.loads((pytester.path / "tags.json").read_text())["sweep_id"] == auto1 == \
        f"auto-{tags['collection_hash']}-3"


@pytest.mark.slow       # about a minute: three pytest processes that import torch
def test_xdist_selects_the_same_and_tags_reach_the_controller(pytester):
    pytester.makepyfile(test_dummy=DUMMY)
    pytester.makeconftest(CONFTEST)
    serial = _selected(pytester, "--shard", "1/2")
    result = pytester.runpytest_subprocess(*PLUGINS, "--shard", "1/2", "-n", "2", "-v")
    assert result.ret == 0
    ran = sorted(re.search(r"(test_dummy\.py::\S+)", ln).group(1) for ln in result.stdout.lines
                 if "PASSED" in ln and "test_dummy.py::" in ln)
    assert ran == sorted(serial)
    tags = json.loads((pytester.path / "tags.json").read_text())
    assert tags["index"] == 1 and sorted(tags["selected"]) == sorted(serial)
