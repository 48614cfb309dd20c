"""``harness merge``: one run JSON from the shard runs of one sweep (``pytest --shard I/N``, ``harness launch``).

The shards must be of one sweep (same sweep id, shard count and collected tests), one configuration (config,
thresholds, model) and one harness commit; anything else is refused with a one-line reason naming the file and the
field. Missing shards (a shard that selected tests but whose run JSON is absent) and duplicated ones (the same shard
index twice, e.g. a rerun) are reported; a partial merge needs ``allow_missing``, and duplicates are resolved only on
request (``keep="latest"``). Each merged record keeps where it came from under ``record["shard"]`` (shard index, the
shard's run id, host and file); the merged run's ``sweep`` section lists the shards. Report, leaderboard and compare
read the merged file like any run JSON.

A shard's records must be what the shard ran and measured: a record of a test the shard did not select
(``shard.selected``) is refused, and so is a shard whose ``summary`` is not the one its records give (a metric or
outcome edited after the run); each in one line naming the file. The merged file is written through a unique
temporary file, fsync'd, and renamed into place (``harness.run.atomic_write_text``).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from .provenance import CORPUS_CONFIG, run_corpora
from .run import BenchmarkRun, _jsonable, atomic_write_text

# top-level fields that legitimately differ between the shards of one sweep (everything else must be equal)
PER_SHARD = frozenset({"run_id", "started", "finished", "duration_s", "machine", "records", "summary", "shard"})
# the shard tags that must be equal across a sweep, with what differing means
SWEEP_FIELDS = (("sweep_id", "sweeps"), ("count", "shard counts"), ("collection_hash", "collected tests"),
                ("harness_commit", "harness commits"))
# provenance differs between shards where it records what one process happened to use (which layers' statistics
# it computed, how many perplexity tokens it scored, its torch seed), not how the sweep was configured: corpora are
# compared by these fields (and their files' sha256 where read); the merged run keeps the union of the statistics
# layers and each shard's torch seed in ``sweep.shards``
HINT = "merge the shards of one sweep (the run JSONs of one `harness launch` or of one set of --shard I/N runs)"


class MergeError(ValueError):
    """Shards that cannot be merged; the message is one line naming the file, the field and the fix."""


@dataclass
class MergeReport:
    """What the merge found: shard indices present, missing, empty (selected no test), duplicated."""

    sweep_id: str
    count: int
    present: list[int] = field(default_factory=list)
    missing: list[int] = field(default_factory=list)
    empty: list[int] = field(default_factory=list)
    duplicates: dict[int, list[str]] = field(default_factory=dict)   # index -> files (the kept one first)
    unrecorded: list[str] = field(default_factory=list)              # selected tests without a record

    def lines(self) -> list[str]:
        out = [f"sweep {self.sweep_id}: {len(self.present)} of {self.count} shards merged"
               + (f"; empty (no tests selected): {_ints(self.empty)}" if self.empty else "")]
        if self.missing:
            out.append(f"missing shards: {_ints(self.missing)} (partial merge)")
        for i, files in sorted(self.duplicates.items()):
            out.append(f"shard {i} given {len(files)} times: kept {files[0]}, dropped {', '.join(files[1:])}")
        if self.unrecorded:
            out.append(f"{len(self.unrecorded)} selected test(s) left no record: {', '.join(self.unrecorded[:5])}"
                       + (" ..." if len(self.unrecorded) > 5 else ""))
        return out


def _ints(xs: Sequence[int]) -> str:
    return ", ".join(map(str, xs))


def load_shard(path: str | Path) -> dict[str, Any]:
    """Read one shard's run JSON (validated as a run), refusing a file without shard tags."""
    from .report import (
        load_run,  # validation shared with report / leaderboard / compare
    )
    run = load_run(path)
    tags = run.get("shard")
    if not isinstance(tags, dict) or not {"sweep_id", "index", "count"} <= set(tags):
        raise MergeError(f"{path}: not a shard run (no 'shard' tags); merge the run JSONs written by "
                         "`pytest --shard I/N` or `harness launch`")
    return run


def _first_difference(a: Any, b: Any, path: str) -> str | None:
    """The first path at which two JSON values differ, with both values (shortened)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            d = _first_difference(a.get(k), b.get(k), f"{path}.{k}")
            if d:
                return d
        return None
    if a != b:
        return f"{path} ({json.dumps(a)[:60]} vs {json.dumps(b)[:60]})"
    return None


def _configuration(key: str, value: Any) -> Any:
    """A top-level run field without its per-process usage : a corpus is compared by what
    was asked of it (spec, tokens/texts requested); its file's digest is checked by :func:`_same_corpus_files`."""
    if key != "provenance" or not isinstance(value, dict):
        return value
    out = dict(value)
    out["seeds"] = {k: v for k, v in (out.get("seeds") or {}).items() if k != "torch_initial_seed"}
    out["corpora"] = {name: {k: corpus.get(k) for k in CORPUS_CONFIG} if isinstance(corpus, dict) else corpus
                      for name, corpus in (out.get("corpora") or {}).items()}
    return out


def _same_corpus_files(runs: Sequence[tuple[str, dict]]) -> None:
    """Shards that read a corpus file must have read the same file (sha256)."""
    seen: dict[str, tuple[str, str]] = {}
    for path, run in runs:
        for name, corpus in run_corpora(run).items():
            digest = corpus.get("sha256") if isinstance(corpus, dict) else None
            if digest is None:
                continue
            ref_path, ref_digest = seen.setdefault(name, (path, digest))
            if digest != ref_digest:
                raise MergeError(f"{path}: provenance.corpora.{name}.sha256 ({digest[:12]} vs {ref_digest[:12]}) "
                                 f"differs from {ref_path}; shards of one sweep must read the same corpus; {HINT}")


def _merged_provenance(shards: Sequence[tuple[str, dict]]) -> dict[str, Any] | None:
    """The first shard's provenance, with each corpus taken from a shard that used it and the statistics layers
    the union over shards."""
    prov = shards[0][1].get("provenance")
    if not isinstance(prov, dict):
        return prov
    prov = copy.deepcopy(prov)
    prov.get("seeds", {}).pop("torch_initial_seed", None)
    for name in list(prov.get("corpora") or {}):
        used = [c for c in (run_corpora(r).get(name) for _, r in shards)
                if isinstance(c, dict) and c.get("used", True) is not False]
        if used:
            prov["corpora"][name] = dict(used[0])
            layers = sorted({int(x) for c in used for x in (c.get("layers") or [])})
            if "layers" in used[0] or layers:
                prov["corpora"][name]["layers"] = layers
    return prov


def check_same_sweep(runs: Sequence[tuple[str, dict]]) -> None:
    """Raise :class:`MergeError` unless every shard belongs to the first one's sweep, configuration and code."""
    ref_path, ref = runs[0]
    for path, run in runs[1:]:
        for key, what in SWEEP_FIELDS:
            if run["shard"].get(key) != ref["shard"].get(key):
                raise MergeError(f"{path}: {key} {run['shard'].get(key)!r} differs from {ref['shard'].get(key)!r} "
                                 f"in {ref_path} (different {what}); {HINT}")
        for key in sorted((set(run) | set(ref)) - PER_SHARD):
            diff = _first_difference(_configuration(key, ref.get(key)), _configuration(key, run.get(key)), key)
            if diff:
                raise MergeError(f"{path}: {diff} differs from {ref_path}; shards of one sweep must share their "
                                 f"configuration; {HINT}")
    _same_corpus_files(runs)


def _pick(runs: Sequence[tuple[str, dict]], keep: str, report: MergeReport) -> dict[int, tuple[str, dict]]:
    """One run per shard index; duplicates refused, or resolved to the latest finished when keep == 'latest'."""
    by_index: dict[int, list[tuple[str, dict]]] = {}
    for path, run in runs:
        by_index.setdefault(int(run["shard"]["index"]), []).append((path, run))
    for i, group in sorted(by_index.items()):
        if len(group) > 1:
            group.sort(key=lambda pr: str(pr[1].get("finished", "")), reverse=True)
            report.duplicates[i] = [p for p, _ in group]
    if report.duplicates and keep != "latest":
        i, files = next(iter(sorted(report.duplicates.items())))
        raise MergeError(f"shard {i} of sweep {report.sweep_id} given {len(files)} times ({', '.join(files)}); "
                         "pass one file per shard, or --keep latest to keep the last finished")
    return {i: group[0] for i, group in by_index.items()}


def merge_runs(runs: Sequence[tuple[str, dict]], allow_missing: bool = False,
               keep: str = "error") -> tuple[dict[str, Any], MergeReport]:
    """Merge shard runs ``[(path, run dict), ...]`` of one sweep into one run dict; returns it and the report."""
    if not runs:
        raise MergeError(f"no shard run JSONs given; {HINT}")
    if keep not in ("error", "latest"):
        raise ValueError(f"keep={keep!r}: use 'error' or 'latest'")
    check_same_sweep(runs)
    first = runs[0][1]["shard"]
    report = MergeReport(sweep_id=first["sweep_id"], count=int(first["count"]))
    chosen = _pick(runs, keep, report)
    sizes = first.get("sizes") or [None] * report.count
    report.present = sorted(chosen)
    report.empty = [i for i in range(1, report.count + 1) if sizes[i - 1] == 0]
    report.missing = [i for i in range(1, report.count + 1) if i not in chosen and sizes[i - 1] != 0]
    if report.missing and not allow_missing:
        raise MergeError(f"sweep {report.sweep_id}: missing shard(s) {_ints(report.missing)} of {report.count} "
                         f"(found {_ints(report.present) or 'none'}); rerun them (harness launch retries a failed "
                         "shard), or pass --allow-missing for a partial merge")
    records = _merged_records(chosen, report)
    shards = [chosen[i] for i in report.present]
    ref = shards[0][1]
    merged = {k: v for k, v in ref.items() if k not in PER_SHARD}
    if "provenance" in ref:
        merged["provenance"] = _merged_provenance(shards)
    started = min(r["started"] for _, r in shards)
    finished = max(r["finished"] for _, r in shards)
    merged.update({
        "run_id": f"{report.sweep_id}-merged", "started": started, "finished": finished,
        "duration_s": (datetime.fromisoformat(finished) - datetime.fromisoformat(started)).total_seconds(),
        "machine": ref.get("machine", {}), "records": records,
        "summary": BenchmarkRun(records=records).summary(),
        "sweep": {"sweep_id": report.sweep_id, "count": report.count, "partial": bool(report.missing),
                  "missing": report.missing, "empty": report.empty,
                  "harness_commit": first.get("harness_commit"), "collection_hash": first.get("collection_hash"),
                  "shards": [_shard_entry(p, r) for p, r in shards],
                  "dropped_duplicates": [f for files in report.duplicates.values() for f in files[1:]]},
    })
    return merged, report


def _merged_records(chosen: dict[int, tuple[str, dict]], report: MergeReport) -> list[dict[str, Any]]:
    """All shards' records, each with its provenance, sorted by node id; a test recorded by two shards (which a
    deterministic assignment never produces) is refused."""
    out: dict[str, dict[str, Any]] = {}
    for i in sorted(chosen):
        path, run = chosen[i]
        host = (run.get("machine") or {}).get("hostname")
        selected = run["shard"].get("selected")
        chosen_tests = set(selected) if isinstance(selected, list) else None
        for rec in run["records"]:
            nodeid = rec.get("nodeid", "")
            if nodeid in out:
                raise MergeError(f"{path}: test {nodeid} is also in shard {out[nodeid]['shard']['index']}; the "
                                 f"shards disagree on the assignment (different collections?); {HINT}")
            if chosen_tests is not None and nodeid not in chosen_tests:
                raise MergeError(f"{path}: a record of test {nodeid}, which shard {i} did not select (shard.selected); "
                                 f"the file was altered or its records are not this shard's; rerun the shard")
            out[nodeid] = {**rec, "shard": {"index": i, "run_id": run.get("run_id"), "hostname": host,
                                            "file": str(path)}}
        recorded = {r.get("nodeid") for r in run["records"]}
        report.unrecorded += [n for n in run["shard"].get("selected", []) if n not in recorded]
    for i in sorted(chosen):
        check_summary(*chosen[i])
    return [out[k] for k in sorted(out)]


def check_summary(path: str, run: dict[str, Any]) -> None:
    """Raise :class:`MergeError` unless the shard's ``summary`` is the one its records give (recomputed as the run
    writer computes it): a metric, outcome or summary edited after the run is refused, not merged."""
    if "summary" not in run:
        return                     # a schema 1 run may have none: nothing to check against
    records = sorted(run["records"], key=lambda r: r.get("nodeid", ""))
    expected = json.loads(json.dumps(_jsonable(BenchmarkRun(records=records).summary())))
    diff = _numbers_differ(run["summary"], expected, "summary")
    if diff:
        raise MergeError(f"{path}: its summary does not match its records ({diff} recomputed); a record or the "
                         "summary was changed after the run; rerun the shard")


def _numbers_differ(stored: Any, expected: Any, path: str) -> str | None:
    """The first place where two JSON values differ (numbers within 1e-9 relative are equal), with both values."""
    if isinstance(stored, dict) and isinstance(expected, dict):
        for k in [*expected, *(k for k in stored if k not in expected)]:     # the writer's order: value first
            d = _numbers_differ(stored.get(k), expected.get(k), f"{path}.{k}")
            if d:
                return d
        return None
    if isinstance(stored, list) and isinstance(expected, list) and len(stored) == len(expected):
        for k, (a, b) in enumerate(zip(stored, expected)):
            label = f"{path}[{k}]"
            if isinstance(a, dict) and isinstance(b, dict) and "suite" in b:
                label = f"{path}[{b.get('suite')}/{b.get('editor')}]"
            d = _numbers_differ(a, b, label)
            if d:
                return d
        return None
    numeric = (int, float)
    if (isinstance(stored, numeric) and isinstance(expected, numeric) and not isinstance(stored, bool)
            and not isinstance(expected, bool) and math.isclose(stored, expected, rel_tol=1e-9, abs_tol=1e-12)):
        return None
    if stored != expected:
        return f"{path} {json.dumps(stored)[:40]} vs {json.dumps(expected)[:40]}"
    return None


def _shard_entry(path: str, run: dict[str, Any]) -> dict[str, Any]:
    m = run.get("machine") or {}
    return {"index": run["shard"]["index"], "file": str(path), "run_id": run.get("run_id"),
            "started": run.get("started"), "finished": run.get("finished"), "duration_s": run.get("duration_s"),
            "n_records": len(run["records"]), "n_selected": len(run["shard"].get("selected", [])),
            "balanced_by": run["shard"].get("balanced_by"),
            "torch_initial_seed": ((run.get("provenance") or {}).get("seeds") or {}).get("torch_initial_seed"),
            "machine": {k: m.get(k) for k in ("hostname", "device", "gpu_name", "torch_threads") if k in m}}


def merge_files(paths: Sequence[str | Path], allow_missing: bool = False,
                keep: str = "error") -> tuple[dict[str, Any], MergeReport]:
    """:func:`merge_runs` over run JSON files."""
    return merge_runs([(str(p), load_shard(p)) for p in paths], allow_missing=allow_missing, keep=keep)


def write_merged(run: dict[str, Any], out: str | Path, html: bool = True) -> list[Path]:
    """Write the merged run JSON (and its HTML report beside it); returns the files written."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(run, indent=1))       # unique temporary name, fsync, atomic rename
    written = [out]
    if html:
        from .report.html import write_html
        written.append(write_html(run, out.with_suffix(".html")))
    return written


# --- command line ---------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``harness merge`` arguments (harness/cli.py registers the subcommand with these)."""
    p.add_argument("runs", type=Path, nargs="+", metavar="RUN.json", help="the shards' run JSONs")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="MERGED.json",
                   help="merged run JSON to write (an HTML report is written beside it)")
    p.add_argument("--allow-missing", action="store_true", help="write a partial merge when shards are missing")
    p.add_argument("--keep", choices=("error", "latest"), default="error",
                   help="a shard given twice: refuse (error, default) or keep the last finished (latest)")
    p.add_argument("--no-html", action="store_true", help="write only the JSON")


def run(args: argparse.Namespace) -> int:
    """``harness merge``: exit 0 merged, 2 refused (one-line reason on stderr)."""
    merged, report = merge_files(args.runs, allow_missing=args.allow_missing, keep=args.keep)
    written = write_merged(merged, args.output, html=not args.no_html)
    for line in report.lines():
        print(line)
    print(f"merged {len(merged['records'])} records: {', '.join(map(str, written))}")
    return 0

