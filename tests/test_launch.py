"""``harness launch`` (harness/launch.py): the retry loop on a fake backend, a shard's job on its own, and the real
thing the issue asks for: a sweep of two editors over built-in cases on a tiny model, in 3 shards through submitit's
LocalExecutor and in 2 shards through a local Ray instance, one shard killed mid-run (SIGKILL) and retried with
``--resume``; the merged run has the same records as an unsharded run of the same tests, timings aside."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness import launch
from harness.cli import main as cli
from harness.launch import LaunchError, ShardFailed, ShardJob, run_shards

from .test_xdist import _diffs

SUITES = Path(__file__).resolve().parents[1] / "suites"
NOISE = ("nodeid", "timings", "memory", "message", "shard")
# kills the shard named by HARNESS_TEST_KILL_SHARD (SIGKILL, as a preempted or OOM-killed job dies) after its
# first test, once: the mark file says it happened, so the resubmitted attempt runs through
KILLER = '''
import os, signal
from pathlib import Path

def pytest_configure(config):
    global SHARD
    SHARD = config.getoption("shard", None)

def pytest_runtest_logfinish(nodeid, location):
    mark = Path(os.environ["HARNESS_TEST_KILL_MARK"])
    if SHARD and SHARD.split("/")[0] == os.environ["HARNESS_TEST_KILL_SHARD"] and not mark.exists():
        mark.write_text(nodeid)
        os.kill(os.getpid(), signal.SIGKILL)
'''


def _suite_args(model_dir: Path, cache: Path) -> list[str]:
    """Two editors x 3 built-in cases (single edits) + each editor's sequential stream of 2 edits: 8 tests."""
    return [str(SUITES / "test_single_edit.py"), str(SUITES / "test_sequential.py"), "--model", str(model_dir),
            "--device", "cpu", "--dataset", "builtin", "--cache-dir", str(cache), "--stats-tokens", "2000",
            "--ppl-texts", "8", "--cases", "3", "--seq-edits", "2", "-p", "no:cacheprovider",
            "--hparam", "rome.layer=1", "--hparam", "ft.layer=1", "--hparam", "v_num_grad_steps=4",
            "--hparam", "context_template_length_params=[[3,2]]", "--editor", "rome", "--editor", "ft",
            "--min-efficacy", "0", "--collapse-ratio", "1e6"]


def _records(run: dict) -> dict[str, dict]:
    return {r["nodeid"].rsplit("/", 1)[-1]: {k: v for k, v in r.items() if k not in NOISE} for r in run["records"]}


def launch_has_submitit() -> bool:
    try:
        import submitit  # noqa: F401
    except ImportError:
        return False
    return True


# --- the retry loop, on a fake backend (no processes) ------------------------------------------------------------
@dataclasses.dataclass
class FakeJob:
    index: int
    fail_attempts: int = 0          # the first N attempts raise
    usage_error: bool = False
    count: int = 3
    sweep_id: str = "fake"
    attempt: int = 1
    resume: bool = False

    def retry(self):
        return dataclasses.replace(self, attempt=self.attempt + 1, resume=True)

    def __call__(self):
        if self.attempt <= self.fail_attempts:
            raise ShardFailed(f"shard {self.index}: killed by signal 9")
        return {"index": self.index, "returncode": 0, "run_json": None, "attempt": self.attempt,
                "resume": self.resume, "usage_error": "pytest usage error: bad" if self.usage_error else None}


class FakeHandle:
    def __init__(self, job):
        self.job, self.cancelled = job, False

    def done(self):
        return True

    def result(self):
        return self.job()

    def cancel(self):
        self.cancelled = True


class FakeBackend:
    def __init__(self):
        self.submitted: list[FakeJob] = []

    def submit(self, job):
        self.submitted.append(job)
        return FakeHandle(job)

    def submit_all(self, jobs):
        return [self.submit(j) for j in jobs]


def test_failed_shards_are_resubmitted_with_resume_up_to_the_limit():
    backend = FakeBackend()
    out = run_shards(backend, [FakeJob(1), FakeJob(2, fail_attempts=2), FakeJob(3, fail_attempts=5)],
                     max_retries=2, poll_s=0, progress=False)
    assert out.results[1]["attempt"] == 1 and not out.results[1]["resume"]
    assert out.results[2]["attempt"] == 3 and out.results[2]["resume"]       # two failures, then through
    assert 3 not in out.results and "gave up after 3 attempts" in out.failures[3]
    assert "killed by signal 9" in out.failures[3] and out.retries == 4
    assert [j.index for j in backend.submitted] == [1, 2, 3, 2, 3, 2, 3]


def test_a_usage_error_stops_the_sweep_without_retry():
    with pytest.raises(LaunchError, match="pytest usage error: bad"):
        run_shards(FakeBackend(), [FakeJob(1, usage_error=True), FakeJob(2)], max_retries=2, poll_s=0,
                   progress=False)


@pytest.mark.parametrize("args,message", [
    (["--", "suites/", "--report-dir", "x"], "--report-dir: harness launch sets --shard, --sweep-id, --report-dir"),
    (["--", "suites/", "--shard=1/2"], "--shard=1/2: harness launch sets"),
    ([], "no pytest arguments; pass them after --"),
])
def test_bad_launch_arguments_are_one_line_errors(tmp_path, capsys, args, message):
    assert cli(["launch", "--shards", "2", "--out", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_a_shard_job_on_its_own(tmp_path):
    job = ShardJob(index=2, count=3, sweep_id="sw", pytest_args=["--no-such-option"], report_dir=str(tmp_path / "r"),
                   log_dir=str(tmp_path / "logs"), cwd=str(tmp_path))
    cmd = job.command()
    assert cmd[:3] == [sys.executable, "-m", "pytest"] and cmd[-6:] == ["--shard", "2/3", "--sweep-id", "sw",
                                                                         "--report-dir", str(tmp_path / "r")]
    again = job.retry()
    assert again.command()[-1] == "--resume" and again.attempt == 2 and again.log_path().name == \
        "shard-2-attempt-2.log"
    if launch_has_submitit():               # SLURM preemption / timeout: submitit requeues what checkpoint returns
        requeued = job.checkpoint().function
        assert requeued.resume and requeued.attempt == 2 and requeued.index == 2
    result = job()                          # pytest refuses the option: a usage error, returned, not retried
    assert result["returncode"] == 4 and "pytest usage error" in result["usage_error"]
    assert "--no-such-option" in Path(result["log"]).read_text()


def test_slurm_job_array_script(tmp_path, monkeypatch):
    """What sbatch would get (submitit writes the script; a fake srun stands in for a SLURM login node)."""
    pytest.importorskip("submitit")
    with pytest.raises(LaunchError, match=r"--backend slurm: .*srun.* \(run harness launch on the cluster's login node"):
        monkeypatch.setenv("PATH", str(tmp_path / "empty"))
        launch.make_backend("slurm", tmp_path / "x", launch.Resources())
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "srun").write_text("#!/bin/sh\nexit 0\n")
    (tmp_path / "bin" / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    backend = launch.make_backend("slurm", tmp_path / "submitit", launch.Resources(
        gpus_per_job=1, cpus_per_job=8, time_limit_min=90, partition="gpu", array_parallelism=2,
        slurm_args={"account": "abc"}))
    slurm = backend.executor._executor
    slurm.parameters["map_count"] = 3          # as submitit sets it for a batch of 3 jobs (one array)
    script = slurm._make_submission_file_text("CMD", "uid")
    for line in ("--partition=gpu", "--gpus-per-node=1", "--cpus-per-task=8", "--time=90", "--array=0-2%2",
                 "--account=abc", "--signal=USR2@"):   # USR2 before the limit: submitit calls ShardJob.checkpoint
        assert f"#SBATCH {line}" in script


# --- the real sweep ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def unsharded(tiny_model_dir, tmp_path_factory):
    """The same tests in one plain pytest run (one thread, as every shard)."""
    d = tmp_path_factory.mktemp("unsharded")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", *_suite_args(tiny_model_dir, d / "cache"),
                           "--report-dir", str(d / "reports")], cwd=d, env=env, capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = json.loads((d / "reports" / "latest.json").read_text())
    assert len(run["records"]) == 8 and "shard" not in run
    return run


def _sweep(backend: str, shards: int, model_dir: Path, tmp_path: Path, monkeypatch, capsys) -> tuple[dict, str]:
    """``harness launch`` with a killer plugin that SIGKILLs shard 2 after its first test, once."""
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "shard_killer.py").write_text(KILLER)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path / "plugins"), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("HARNESS_TEST_KILL_SHARD", "2")
    monkeypatch.setenv("HARNESS_TEST_KILL_MARK", str(tmp_path / "killed"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MKL_NUM_THREADS", "1")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "sweep"
    rc = cli(["launch", "--backend", backend, "--shards", str(shards), "--out", str(out), "--sweep-id", "sw-test",
                      "--poll", "0.5", "--no-progress", "--time-limit", "20", "--",
                      *_suite_args(model_dir, tmp_path / "cache"), "-p", "shard_killer"])
    printed = capsys.readouterr()
    assert rc == 0, printed.out + printed.err
    assert (tmp_path / "killed").exists(), "the killer never fired: the retry was not exercised"
    return json.loads((out / "merged.json").read_text()), printed.out + printed.err


def _check_equal(merged: dict, unsharded: dict, shards: int, output: str) -> None:
    assert merged["sweep"]["count"] == shards and not merged["sweep"]["partial"]
    assert sorted(s["index"] for s in merged["sweep"]["shards"]) == list(range(1, shards + 1))
    assert "(1 resubmission(s))" in output
    a, b = _records(unsharded), _records(merged)
    assert set(a) == set(b) and len(a) == 8
    problems = [f"{k}{d}" for k in sorted(a) for d in _diffs(a[k], b[k])]
    assert not problems, "merged sweep differs from the unsharded run:\n" + "\n".join(problems)
    assert merged["config"] == unsharded["config"] and merged["model"] == unsharded["model"]
    assert {r["shard"]["index"] for r in merged["records"]} == set(range(1, shards + 1))
    # each sequential stream stayed whole (one test each) and ran in one shard
    assert sum(r["suite"] == "sequential" for r in merged["records"]) == 2


@pytest.mark.slow       # minutes: four pytest processes and a retry (tox -e tests-slow: --dist loadfile keeps this
                        # module on one worker, so the module's unsharded run happens once)
def test_local_sweep_with_a_killed_shard_equals_the_unsharded_run(unsharded, tiny_model_dir, tmp_path,
                                                                 monkeypatch, capsys):
    pytest.importorskip("submitit")
    merged, output = _sweep("local", 3, tiny_model_dir, tmp_path, monkeypatch, capsys)
    _check_equal(merged, unsharded, 3, output)
    logs = sorted(p.name for p in (tmp_path / "sweep" / "logs").iterdir())
    assert "shard-2-attempt-2.log" in logs and "--resume" in (tmp_path / "sweep" / "logs" /
                                                              "shard-2-attempt-2.log").read_text().splitlines()[0]
    assert (tmp_path / "sweep" / "merged.html").is_file()


@pytest.mark.slow       # minutes: a local Ray instance, three pytest processes and a retry
def test_ray_sweep_with_a_killed_shard_equals_the_unsharded_run(unsharded, tiny_model_dir, tmp_path,
                                                               monkeypatch, capsys):
    pytest.importorskip("ray")
    merged, output = _sweep("ray", 2, tiny_model_dir, tmp_path, monkeypatch, capsys)
    _check_equal(merged, unsharded, 2, output)
