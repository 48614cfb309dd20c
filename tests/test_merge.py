"""``harness merge`` (harness/merge.py) on shard runs built as the sharding plugin tags them: the merge is the
union with per-record provenance; shards of another sweep, configuration, model or commit are refused with one
line; missing, empty and duplicated shards are told apart; the merged file reads like any run."""
from __future__ import annotations

import copy
import json
import re

import pytest

from harness.cli import main as cli
from harness.merge import MergeError, load_shard, merge_files, merge_runs
from harness.report import load_run
from harness.report.compare import compare
from harness.report.leaderboard import leaderboard
from harness.run import BenchmarkRun
from harness.sharding import assign, collection_hash

COUNT = 3


def _record(editor: str, case: int) -> dict:
    nodeid = f"suites/test_single_edit.py::test_single_edit[{editor}-c{case}]"
    return {"suite": "single_edit", "editor": editor, "case_id": f"c{case}", "subject": f"S{case}",
            "nodeid": nodeid, "outcome": "passed", "message": None,
            "metrics": {"efficacy_success": 1.0 if case % 2 else 0.5, "ppl_ratio": 1.0 + case / 100},
            "protocols": {"efficacy_success": "rome-counterfact"}, "info": {},
            "timings": {"edit": 1.0 + case}, "memory": {"peak_rss_mb": 100.0}}


def _unsharded() -> dict:
    records = sorted((_record(e, c) for e in ("rome", "memit") for c in range(6)), key=lambda r: r["nodeid"])
    return {"schema_version": 1, "run_id": "whole", "started": "2026-01-01T00:00:00+00:00",
            "finished": "2026-01-01T00:10:00+00:00", "duration_s": 600.0,
            "model": {"name": "tiny", "family": "llama", "fingerprint": "abc"},
            "machine": {"hostname": "node0", "device": "cpu"},
            "config": {"editors": ["rome", "memit"], "n_cases": 6, "hparam_overrides": [],
                       "thresholds": {"collapse_ppl_ratio": 2.0}},
            "records": records, "summary": BenchmarkRun(records=records).summary()}


def _shards(whole: dict, sweep: str = "sw", commit: str = "c0ffee") -> list[dict]:
    """The whole run cut into COUNT shard runs, tagged as harness/sharding.py tags them."""
    ids = [r["nodeid"] for r in whole["records"]]
    where = assign({n: [n] for n in ids}, COUNT)
    sizes = [sum(s == i for s in where.values()) for i in range(1, COUNT + 1)]
    out = []
    for i in range(1, COUNT + 1):
        run = copy.deepcopy(whole)
        run["records"] = [r for r in run["records"] if where[r["nodeid"]] == i]
        run["run_id"] = f"shard{i}"
        run["started"], run["finished"] = f"2026-01-01T00:0{i}:00+00:00", f"2026-01-01T00:0{i + 3}:00+00:00"
        run["machine"] = {"hostname": f"node{i}", "device": "cpu"}
        run["summary"] = BenchmarkRun(records=run["records"]).summary()
        run["shard"] = {"sweep_id": sweep, "index": i, "count": COUNT, "collected": len(ids),
                        "collection_hash": collection_hash(ids), "sizes": sizes,
                        "selected": sorted(r["nodeid"] for r in run["records"]), "balanced_by": "count",
                        "harness_commit": commit}
        out.append(run)
    return out


def _named(runs: list[dict]) -> list[tuple[str, dict]]:
    return [(f"shard-{r['shard']['index']}.json", r) for r in runs]


def test_merge_is_the_union_with_provenance(tmp_path):
    whole = _unsharded()
    shards = _shards(whole)
    assert all(s["records"] for s in shards)                   # every shard got some tests
    merged, report = merge_runs(_named(shards))
    assert report.present == [1, 2, 3] and not report.missing and not report.duplicates and not report.unrecorded
    strip = [{k: v for k, v in r.items() if k != "shard"} for r in merged["records"]]
    assert strip == whole["records"]          # sorted by node id, as the run writer sorts them
    assert merged["summary"] == whole["summary"]
    for rec in merged["records"]:
        i = rec["shard"]["index"]
        assert rec["shard"] == {"index": i, "run_id": f"shard{i}", "hostname": f"node{i}", "file": f"shard-{i}.json"}
    assert merged["config"] == whole["config"] and merged["model"] == whole["model"] and "shard" not in merged
    assert merged["started"] == "2026-01-01T00:01:00+00:00" and merged["finished"] == "2026-01-01T00:06:00+00:00"
    assert merged["duration_s"] == 300.0
    sweep = merged["sweep"]
    assert (sweep["sweep_id"], sweep["count"], sweep["partial"], sweep["harness_commit"]) == ("sw", 3, False, "c0ffee")
    assert [s["machine"]["hostname"] for s in sweep["shards"]] == ["node1", "node2", "node3"]
    # the merged file is a run like any other: load_run validates it, compare and leaderboard read it
    path = tmp_path / "merged.json"
    path.write_text(json.dumps(merged))
    assert load_run(path)["run_id"] == "sw-merged"
    assert compare(whole, merged).ok
    a, b = leaderboard([whole]), leaderboard([merged])
    assert len(a) == 2 and a.equals(b)


def _write(tmp_path, runs: list[dict]) -> list[str]:
    paths = []
    for k, run in enumerate(runs):
        p = tmp_path / f"run-{k}.json"
        p.write_text(json.dumps(run))
        paths.append(str(p))
    return paths


def _alter(field: str):
    def change(run: dict) -> None:
        if field == "sweep":
            run["shard"]["sweep_id"] = "other"
        elif field == "count":
            run["shard"]["count"] = 4
        elif field == "commit":
            run["shard"]["harness_commit"] = "deadbeef"
        elif field == "collection":
            run["shard"]["collection_hash"] = "0" * 16
        elif field == "config":
            run["config"]["hparam_overrides"] = ["rome.layer=3"]
        elif field == "thresholds":
            run["config"]["thresholds"]["collapse_ppl_ratio"] = 1.5
        elif field == "model":
            run["model"]["fingerprint"] = "xyz"
    return change


@pytest.mark.parametrize("field,message", [
    ("sweep", "sweep_id 'other' differs from 'sw' * (different sweeps); merge the shards of one sweep*"),
    ("count", "count 4 differs from 3 * (different shard counts)*"),
    ("commit", "harness_commit 'deadbeef' differs from 'c0ffee' * (different harness commits)*"),
    ("collection", "collection_hash * (different collected tests)*"),
    ("config", ("config.hparam_overrides ([] vs [\"rome.layer=3\"]) differs from *; shards of one sweep must share "
               "their configuration*")),
    ("thresholds", "config.thresholds.collapse_ppl_ratio (2.0 vs 1.5) differs from *"),
    ("model", "model.fingerprint (\"abc\" vs \"xyz\") differs from *"),
])
def test_refuses_shards_of_different_sweeps_configurations_or_commits(tmp_path, capsys, field, message):
    shards = _shards(_unsharded())
    _alter(field)(shards[1])
    with pytest.raises(MergeError) as e:
        merge_files(_write(tmp_path, shards))
    assert "\n" not in str(e.value) and str(e.value).startswith(str(tmp_path / "run-1.json"))
    # the command line: exit 2, the reason on one line
    assert cli(["merge", *_write(tmp_path, shards), "-o", str(tmp_path / "m.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    pattern = ".*".join(map(re.escape, f"harness merge: error: *{message}".split("*")))
    assert re.fullmatch(pattern, err), err
    assert not (tmp_path / "m.json").exists()


def test_refuses_a_run_that_is_not_a_shard(tmp_path):
    plain = _write(tmp_path, [_unsharded()])
    with pytest.raises(MergeError, match=r"run-0.json: not a shard run \(no 'shard' tags\); merge the run JSONs "
                                         r"written by `pytest --shard I/N` or `harness launch`"):
        load_shard(plain[0])


def test_missing_shard_is_refused_unless_allowed(tmp_path):
    shards = _shards(_unsharded())
    with pytest.raises(MergeError, match=r"sweep sw: missing shard\(s\) 2 of 3 \(found 1, 3\); rerun them .* "
                                         r"--allow-missing for a partial merge"):
        merge_runs(_named([shards[0], shards[2]]))
    merged, report = merge_runs(_named([shards[0], shards[2]]), allow_missing=True)
    assert report.missing == [2] and merged["sweep"]["partial"] is True and merged["sweep"]["missing"] == [2]
    assert len(merged["records"]) == len(shards[0]["records"]) + len(shards[2]["records"])
    assert "missing shards: 2 (partial merge)" in report.lines()


def test_an_empty_shard_is_not_missing():
    shards = _shards(_unsharded())
    for s in shards:                 # as if shard 3 had selected nothing (more shards than tests)
        s["shard"]["sizes"][2] = 0
    merged, report = merge_runs(_named(shards[:2]))
    assert report.empty == [3] and not report.missing and merged["sweep"]["partial"] is False


def test_duplicated_shards_are_reported_and_resolved_on_request(tmp_path):
    shards = _shards(_unsharded())
    rerun = copy.deepcopy(shards[1])
    rerun["run_id"], rerun["finished"] = "shard2-rerun", "2026-01-02T00:00:00+00:00"
    paths = _write(tmp_path, [*shards, rerun])
    with pytest.raises(MergeError, match=r"shard 2 of sweep sw given 2 times \(.*run-3.json, .*run-1.json\); pass "
                                         r"one file per shard, or --keep latest"):
        merge_files(paths)
    merged, report = merge_files(paths, keep="latest")
    assert report.duplicates == {2: [paths[3], paths[1]]}
    assert {r["shard"]["run_id"] for r in merged["records"] if r["shard"]["index"] == 2} == {"shard2-rerun"}
    assert merged["sweep"]["dropped_duplicates"] == [paths[1]]
    assert any(line.startswith("shard 2 given 2 times: kept") for line in report.lines())


def test_a_test_recorded_by_two_shards_is_refused():
    shards = _shards(_unsharded())
    shards[1]["records"].append(copy.deepcopy(shards[0]["records"][0]))
    with pytest.raises(MergeError, match=r"shard-2.json: test .* is also in shard 1; the shards disagree"):
        merge_runs(_named(shards))


def test_selected_tests_without_records_are_reported():
    shards = _shards(_unsharded())
    lost = shards[0]["records"].pop()
    shards[0]["summary"] = BenchmarkRun(records=shards[0]["records"]).summary()     # as the run writer computes it
    _merged, report = merge_runs(_named(shards))
    assert report.unrecorded == [lost["nodeid"]]
    assert any("1 selected test(s) left no record" in line for line in report.lines())


def test_command_line_writes_json_and_html(tmp_path, capsys):
    paths = _write(tmp_path, _shards(_unsharded()))
    out = tmp_path / "sweep" / "merged.json"
    assert cli(["merge", *paths, "-o", str(out)]) == 0
    assert load_run(out)["sweep"]["count"] == 3 and out.with_suffix(".html").is_file()
    assert "sweep sw: 3 of 3 shards merged" in capsys.readouterr().out


def _with_provenance(run: dict, layers: list[int] | None, seed: int, sha: str | None = "f" * 64) -> dict:
    stats = ({"spec": "wikitext", "path": "/d/wiki.txt", "sha256": sha, "tokens_requested": 1000,
              "tokens_used": {"min": 1000}, "layers": layers} if layers is not None
             else {"spec": "wikitext", "tokens_requested": 1000, "used": False})
    run["provenance"] = {"editors": {}, "corpora": {"statistics": stats,
                                                    "perplexity": {"spec": "me-ppl", "texts_requested": 10,
                                                                   "texts": None if layers is None else 10}},
                         "seeds": {"bootstrap": 0, "torch_initial_seed": seed}}
    return run


def test_per_process_usage_is_not_configuration_and_merges_as_a_union():
    """Shards differ in what each process used (statistics layers, perplexity texts scored, torch seed): the merge
    accepts that, keeps the union of layers and each shard's seed; a different corpus file is still refused."""
    shards = _shards(_unsharded())
    _with_provenance(shards[0], [1], seed=11)
    _with_provenance(shards[1], None, seed=22)          # a resumed shard that computed no statistics
    _with_provenance(shards[2], [1, 3], seed=33)
    merged, _ = merge_runs(_named(shards))
    stats = merged["provenance"]["corpora"]["statistics"]
    assert stats["layers"] == [1, 3] and stats["sha256"] == "f" * 64
    assert "torch_initial_seed" not in merged["provenance"]["seeds"]
    assert [s["torch_initial_seed"] for s in merged["sweep"]["shards"]] == [11, 22, 33]
    _with_provenance(shards[2], [1], seed=33, sha="0" * 64)
    with pytest.raises(MergeError, match=r"provenance\.corpora\.statistics\.sha256 .* same corpus"):
        merge_runs(_named(shards))
    _with_provenance(shards[2], [1], seed=33)
    shards[2]["provenance"]["corpora"]["statistics"]["tokens_requested"] = 5
    with pytest.raises(MergeError, match=r"tokens_requested \(1000 vs 5\)"):
        merge_runs(_named(shards))
