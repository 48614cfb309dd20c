"""Provenance: each small function on plain values, and ``collect`` on a real session that never loaded a model
(it must not load one), whose result validates against the run schema."""
from __future__ import annotations

import hashlib
import json
import subprocess

import pytest

from harness import provenance as prov
from harness.editors.base import HPARAMS_DIR
from harness.run import BenchmarkRun
from harness.schema import SCHEMA_VERSION, schema_errors


def test_sha256_file(tmp_path):
    f = tmp_path / "x.bin"
    f.write_bytes(b"abc" * 1000)
    assert prov.sha256_file(f) == hashlib.sha256(b"abc" * 1000).hexdigest()
    assert prov.sha256_file(tmp_path / "missing") is None and prov.sha256_file(None) is None


def test_git_state_commit_and_dirty_flag(tmp_path):
    assert prov.git_state(tmp_path) == {"git_commit": None, "git_dirty": None}        # not a git tree
    git = ["git", "-C", str(tmp_path), "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "a.txt").write_text("1")
    subprocess.run([*git, "add", "a.txt"], check=True)
    subprocess.run([*git, "commit", "-qm", "x"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    assert prov.git_state(tmp_path) == {"git_commit": head, "git_dirty": False}
    (tmp_path / "untracked.txt").write_text("ignored: only tracked changes count")
    assert prov.git_state(tmp_path)["git_dirty"] is False
    (tmp_path / "a.txt").write_text("2")
    assert prov.git_state(tmp_path) == {"git_commit": head, "git_dirty": True}


def test_hparam_files_and_editor_provenance():
    files = prov.hparam_files("memit", "llama", HPARAMS_DIR)
    assert [p.name for p in files] == ["llama.yaml"]
    assert [p.name for p in prov.hparam_files("memit", "no-such-family", HPARAMS_DIR)] == []
    out = prov.resolve_editor("memit", ["memit.mom2_update_weight=1234", "rome.layer=3"], "llama", 30)
    assert out["hparams"]["mom2_update_weight"] == 1234.0        # the resolved value, override applied
    assert out["overrides"] == {"mom2_update_weight": "1234"}     # only memit's overrides
    assert [f["path"] for f in out["files"]] == ["hparams/memit/llama.yaml"]
    assert out["files"][0]["sha256"] == hashlib.sha256((HPARAMS_DIR / "memit" / "llama.yaml").read_bytes()).hexdigest()
    assert out["class"] == "harness.editors.memit:MEMIT" or out["class"].startswith("harness.editors.memit:")
    rome = prov.resolve_editor("rome", [], "llama", 30)
    assert isinstance(rome["hparams"]["layer"], int) and 0 <= rome["hparams"]["layer"] < 30
    bad = prov.resolve_editor("rome", ["rome.layer=99"], "llama", 30)      # recorded, not raised: the run is over
    assert bad["hparams"] is None and "layer 99" in bad["error"]


def test_dataset_and_corpus_provenance(tmp_path):
    from harness.data.loaders import BUILTIN_DIR
    d = prov.dataset_provenance("builtin", None, ["b01", "b02"], requested="auto")
    assert d["kind"] == "builtin" and d["path"] == str(BUILTIN_DIR / "edits.json")
    assert d["sha256"] == prov.sha256_file(BUILTIN_DIR / "edits.json") and d["requested"] == "auto"
    assert (d["n_cases"], d["case_ids"]) == (2, ["b01", "b02"])
    f = tmp_path / "mine.json"
    f.write_text("[]")
    assert prov.dataset_provenance(str(f), None, [])["kind"] == "file"
    assert prov.dataset_provenance(str(f), None, [])["sha256"] == hashlib.sha256(b"[]").hexdigest()
    hub = prov.dataset_provenance("hf:owner/name", None, None)
    assert hub["kind"] == "hub" and hub["path"] is None and hub["n_cases"] is None
    named = prov.dataset_provenance("counterfact", tmp_path, ["1"])       # not in this data dir
    assert named["path"] == str(tmp_path / "counterfact" / "counterfact_rome_sample500.json") and named["sha256"] is None
    c = prov.corpus_provenance("builtin-sentences", None, texts=50, tokens=700)
    assert c == {"spec": "builtin-sentences", "path": None, "sha256": None, "texts": 50, "tokens": 700}
    assert prov.corpus_provenance("builtin", None)["sha256"] == prov.sha256_file(BUILTIN_DIR / "passages.json")


def test_stats_tokens_used_reads_what_the_statistics_object_records():
    class Plain:
        pass

    class Counted:
        tokens_used = {5: 100_000}

    class Method:
        def n_tokens_used(self):
            return 4096

    assert prov.stats_tokens_used(Plain()) is None
    assert prov.stats_tokens_used(Counted()) == {5: 100_000}
    assert prov.stats_tokens_used(Method()) == 4096


def test_collect_on_a_session_that_never_loaded_the_model():
    from harness.session import HarnessSession, Options
    session = HarnessSession(Options(editors=["rome", "memit"], dataset="builtin", n_cases=3,
                                     hparams=["rome.layer=4"], progress=False))
    out = prov.collect(session, model={"family": "llama", "n_layers": 30})
    assert session._lm is None                                   # nothing was loaded to describe the run
    assert out["harness"]["version"] and "git_commit" in out["harness"]
    assert out["editors"]["rome"]["hparams"]["layer"] == 4 and out["editors"]["rome"]["overrides"] == {"layer": "4"}
    assert out["dataset"]["case_ids"] == ["b01", "b02", "b03"] and out["dataset"]["n_cases"] == 3
    assert out["corpora"]["perplexity"]["spec"] == "builtin-sentences"
    assert out["corpora"]["statistics"] == {"spec": "auto", "tokens_requested": "auto", "used": False}
    assert out["seeds"]["bootstrap"] and "torch_initial_seed" in out["seeds"]
    # seeds come from the configuration, not from what this process built: the same in every shard of a sweep
    assert out["seeds"]["tracing_noise"] == 1 and session._tracer is None
    assert out["seeds"]["memit.template_seed"] == 0 and not session._editors
    run = BenchmarkRun(config={"editors": ["rome", "memit"]}, provenance=out)
    data = json.loads(json.dumps(run.to_json(model={"name": "m"}, machine={"hostname": "h"})))
    assert data["schema_version"] == SCHEMA_VERSION == 2
    assert schema_errors(data) == []


def test_schema_rejects_a_version_2_run_without_provenance():
    run = json.loads(json.dumps(BenchmarkRun().to_json(model={"name": "m"}, machine={})))
    assert schema_errors(run) == []
    assert run["provenance"] == {"error": "not collected (a BenchmarkRun written without the plugin)"}
    run["provenance"] = {"harness": {}}
    assert schema_errors(run)                                    # neither complete nor an error
    del run["provenance"]
    assert schema_errors(run) == ["at $: 'provenance' is a required property"]
    run["schema_version"] = 1                                    # old runs had none, and still validate
    assert schema_errors(run) == []


@pytest.mark.parametrize("field, value", [("summary", [{"suite": "s"}]), ("records", [{"timings": {"edit": "x"}}])])
def test_schema_checks_the_shapes_the_reports_read(field, value):
    run = json.loads(json.dumps(BenchmarkRun().to_json(model={"name": "m"}, machine={})))
    run[field] = value
    assert schema_errors(run)
