"""Deterministic sharding of a benchmark over machines: ``pytest suites/ --shard I/N`` runs a stable 1/N of the
collected tests (a pytest plugin; ``harness launch`` starts one such pytest per shard and ``harness merge`` joins
their run JSONs).

* Stable: a test's shard depends on its node id (hashed with SHA-1, not Python's salted ``hash``) and on the
  collected set, never on collection order, the machine or the run; every shard of a sweep computes the same
  assignment for all N shards and keeps its own part.
* Grouped: tests marked ``@pytest.mark.shard_group("name")`` that share the name (and the values of the parameters
  named in ``by=``, by default the editor) run in one shard, e.g. the steps of one editor's sequential stream, or
  one editor's batch of cases. Every other test is a group of its own.
* Balanced: with ``--shard-durations RUN.json`` (earlier run JSONs, merged or not), by the seconds each test took,
  as pytest-split's ``least_duration`` does (longest group first onto the least loaded shard; unknown tests count
  the mean known duration); without, by the number of tests.
* Tagged: :func:`shard_tags` gives what the run writer stores under ``run["shard"]``: sweep id, shard index and
  count, the collection's hash and per-shard sizes (so a merge can tell a missing shard from an empty one), the
  node ids this shard selected, and the harness commit (so a merge refuses shards of different code).

Under pytest-xdist the workers collect and select (each computes the same selection); the tags travel to the
controller in ``workeroutput``, as pytest-cov's data does.
"""
from __future__ import annotations

import hashlib
import heapq
import json
import statistics
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

_TAGS = pytest.StashKey[dict]()
_CONFIG = pytest.StashKey[tuple]()        # (ShardSpec, durations, sweep id) of a sharded run
WORKER_KEY = "harness_shard_tags"
GROUP_MARKER = "shard_group"


# --- the shard spec --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardSpec:
    """Shard ``index`` (1-based) of ``count`` (``--shard I/N``, parsed by the option table)."""

    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def stable_hash(text: str) -> int:
    """A hash that is the same on every machine and in every process (Python's ``hash`` of a str is salted)."""
    return int.from_bytes(hashlib.sha1(text.encode()).digest()[:8], "big")


def portable_id(nodeid: str) -> str:
    """A node id without the folders of its file (``suites/test_x.py::t[a]`` -> ``test_x.py::t[a]``): the same
    test collected from another checkout path or rootdir gets the same id."""
    path, sep, rest = nodeid.partition("::")
    return path.replace("\\", "/").rsplit("/", 1)[-1] + sep + rest


# --- groups and assignment -------------------------------------------------------------------------------
def group_key(item: pytest.Item) -> str:
    """The group a test belongs to: its own node id, or for ``@pytest.mark.shard_group(name, by=(params...))``
    the name, the test file and the values of the ``by`` parameters (default: ``editor_name``)."""
    marker = item.get_closest_marker(GROUP_MARKER)
    if marker is None:
        return portable_id(item.nodeid)
    name = marker.args[0] if marker.args else item.name.split("[")[0]
    by: Sequence[str] = marker.kwargs.get("by", ("editor_name",))
    params = getattr(getattr(item, "callspec", None), "params", {})
    values = ",".join(f"{p}={getattr(params.get(p), 'case_id', params.get(p))}" for p in by)
    return f"{portable_id(item.nodeid).split('::')[0]}::{name}[{values}]"


def assign(groups: Mapping[str, Sequence[str]], count: int,
           durations: Mapping[str, float] | None = None) -> dict[str, int]:
    """Shard (1-based) of every group. ``groups``: group key -> portable node ids of its tests. Weight of a group:
    the sum of its tests' durations (a test without one counts the mean known duration), or its number of tests
    when no durations are given. Heaviest group first onto the least loaded shard (ties: lowest shard index);
    groups of equal weight are taken in order of their stable hash, so the result does not depend on collection
    order."""
    durations = durations or {}
    known = [durations[n] for ids in groups.values() for n in ids if n in durations]
    default = statistics.fmean(known) if known else 1.0

    def weight(ids: Sequence[str]) -> float:
        return sum(durations.get(n, default) for n in ids) if known else float(len(ids))

    order = sorted(groups, key=lambda k: (-weight(groups[k]), stable_hash(k), k))
    loads = [(0.0, i) for i in range(1, count + 1)]         # a heap of (load, shard index)
    out: dict[str, int] = {}
    for key in order:
        load, index = heapq.heappop(loads)
        out[key] = index
        heapq.heappush(loads, (load + weight(groups[key]), index))
    return out


def load_durations(paths: Iterable[str | Path]) -> dict[str, float]:
    """Seconds per test (portable node id) from earlier run JSONs: a record's ``duration_s`` when the run writer
    stored one, else the sum of its phase timings; the mean over files when a test appears in several."""
    seen: dict[str, list[float]] = {}
    for path in paths:
        p = Path(path)
        try:
            run = json.loads(p.read_text(encoding="utf-8"))
            records = run["records"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"--shard-durations {p}: not a readable run JSON ({type(e).__name__}: {e}); pass a "
                             "run JSON written by the harness (reports/run-<id>.json)") from None
        for rec in records:
            if not isinstance(rec, dict) or not rec.get("nodeid"):
                continue
            secs = rec.get("duration_s")
            if not isinstance(secs, (int, float)):
                secs = sum(v for v in (rec.get("timings") or {}).values() if isinstance(v, (int, float)))
            if secs > 0:
                seen.setdefault(portable_id(rec["nodeid"]), []).append(float(secs))
    return {k: statistics.fmean(v) for k, v in seen.items()}


def collection_hash(ids: Iterable[str]) -> str:
    """What the shards of one sweep must agree on: the whole collected set (portable node ids)."""
    return hashlib.sha1("\n".join(sorted(ids)).encode()).hexdigest()[:16]


def harness_commit() -> str:
    """The git commit of the harness code in use, ``<sha>-dirty-<hash of the diff>`` for a changed tree, or the
    package version when the harness is not a git checkout."""
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30,
                              check=True).stdout
    try:
        if Path(git("rev-parse", "--show-toplevel").strip()).resolve() != root:
            raise OSError("the harness is not the top of this git checkout (an installed copy)")
        sha = git("rev-parse", "HEAD").strip()
        diff = git("diff", "HEAD", "--", "harness")
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import PackageNotFoundError, version
        try:
            return f"knowedit-harness=={version('knowedit-harness')}"
        except PackageNotFoundError:
            return "unknown"
    return f"{sha}-dirty-{hashlib.sha1(diff.encode()).hexdigest()[:8]}" if diff else sha


# --- the plugin ----------------------------------------------------------------------------------------------
def pytest_configure(config: pytest.Config) -> None:
    """Read ``--shard``, ``--shard-durations`` and ``--sweep-id`` (rows of the option table, harness/options.py;
    a malformed value is a usage error there) and the durations files, before anything is collected."""
    from .options import value
    config.addinivalue_line("markers", f"{GROUP_MARKER}(name, by=('editor_name',)): tests with the same name and "
                                       "values of the 'by' parameters run in the same shard (--shard)")
    spec = value(config, "shard")
    if spec is None:
        return
    try:
        durations = load_durations(value(config, "shard_durations"))
    except ValueError as e:
        raise pytest.UsageError(str(e)) from None
    config.stash[_CONFIG] = (ShardSpec(*spec), durations, value(config, "sweep_id"))


@pytest.hookimpl(trylast=True)       # after -k / -m deselection, so every shard splits the same set
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _CONFIG not in config.stash:
        return
    spec, durations, sweep_id = config.stash[_CONFIG]
    groups: dict[str, list[str]] = {}
    key_of = {}
    for item in items:
        key_of[item.nodeid] = key = group_key(item)
        groups.setdefault(key, []).append(portable_id(item.nodeid))
    where = assign(groups, spec.count, durations)
    selected = [it for it in items if where[key_of[it.nodeid]] == spec.index]
    deselected = [it for it in items if where[key_of[it.nodeid]] != spec.index]
    items[:] = selected
    if deselected:
        config.hook.pytest_deselected(items=deselected)
    ids = [portable_id(it.nodeid) for it in selected + deselected]
    sizes = [sum(len(groups[k]) for k, s in where.items() if s == i) for i in range(1, spec.count + 1)]
    timed = sum(n in durations for n in ids)
    tags = {"sweep_id": sweep_id or f"auto-{collection_hash(ids)}-{spec.count}",
            "index": spec.index, "count": spec.count, "collected": len(ids), "collection_hash": collection_hash(ids),
            "sizes": sizes, "selected": sorted(it.nodeid for it in selected),
            "balanced_by": f"durations ({timed} of {len(ids)} tests timed)" if timed else "count",
            "harness_commit": harness_commit()}
    config.stash[_TAGS] = tags
    workeroutput = getattr(config, "workeroutput", None)
    if workeroutput is not None:              # an xdist worker: the controller writes the run JSON
        workeroutput[WORKER_KEY] = json.dumps(tags)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    """xdist controller: take the tags from the first worker that reports them (all compute the same ones)."""
    text = getattr(node, "workeroutput", {}).get(WORKER_KEY)
    if text and _TAGS not in node.config.stash:
        node.config.stash[_TAGS] = json.loads(text)


def pytest_report_collectionfinish(config: pytest.Config, items: Sequence[pytest.Item]) -> str | None:
    tags = config.stash.get(_TAGS, None)
    if tags is None:
        return None
    return (f"shard {tags['index']}/{tags['count']} of sweep {tags['sweep_id']}: {len(tags['selected'])} of "
            f"{tags['collected']} tests, balanced by {tags['balanced_by']}")


def shard_tags(config: pytest.Config) -> dict[str, Any] | None:
    """The tags of this run's shard for ``run["shard"]``, or None when the run is not sharded. The run writer
    calls this (or the ``pytest_harness_update_run_json`` hook below does)."""
    return config.stash.get(_TAGS, None)


@pytest.hookimpl(optionalhook=True)      # the spec: harness/hookspec.py, registered by the harness plugin
def pytest_harness_update_run_json(config: pytest.Config, run: dict[str, Any]) -> None:
    """Tag a shard's run JSON (the harness's own hook; see harness/hookspec.py)."""
    tags = shard_tags(config)
    if tags is not None:
        run["shard"] = tags
