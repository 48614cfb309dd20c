"""``harness launch --backend slurm|ray|local --shards N -- <pytest arguments>``: one job per shard, then the merge.

Each job runs ``python -m pytest <arguments> --shard I/N --sweep-id ID --report-dir OUT/shard-I`` (harness/sharding.py
selects the tests), through submitit (``slurm``: one SLURM job array with partition, GPUs per job, time limit and
array throttling; ``local``: submitit's LocalExecutor, one process per shard on this machine) or through Ray (one
task per shard with ``num_gpus``, on ``ray.init(address=...)``, a local Ray instance by default). The launcher waits
with a progress bar, resubmits a failed shard (killed, crashed, preempted) up to ``--max-retries`` times with
``--resume`` added, so a sequential stream continues from its journal in the shard's report folder, and finishes
with ``harness merge`` of the shards' run JSONs into ``OUT/merged.json`` (and its HTML report).

A shard whose tests failed (a benchmark threshold) has done its job: pytest exit code 1 is a result, not a failure.
Failures are exit codes 2 and 3 (interrupted, internal error), a signal, or no run JSON; a usage error (exit 4)
stops the sweep at once, since a retry cannot fix it. submitit and Ray are optional extras
(``pip install 'knowedit-harness[cluster]'``).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

BACKENDS = ("local", "slurm", "ray")
RESULT_CODES = {0: "passed", 1: "tests failed (recorded)", 5: "no tests selected"}
OWN_OPTIONS = ("--shard", "--sweep-id", "--report-dir")     # the launcher sets these per shard
ENV_PASSED = ("PYTHONPATH", "HARNESS_DATA_DIR", "HARNESS_CACHE_DIR", "HARNESS_MODEL", "OMP_NUM_THREADS",
              "MKL_NUM_THREADS", "HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


class LaunchError(ValueError):
    """Bad launcher input or a missing backend; the message is one line naming the cause and the fix."""


class ShardFailed(RuntimeError):
    """A shard's job ended without a usable run JSON (killed, crashed, interrupted); worth a retry."""


# --- one shard ------------------------------------------------------------------------------------------------
@dataclass
class ShardJob:
    """What one shard runs; a picklable callable (submitit, Ray). ``checkpoint`` is submitit's hook on preemption
    or timeout: the job is requeued with ``--resume``."""

    index: int
    count: int
    sweep_id: str
    pytest_args: list[str]
    report_dir: str
    log_dir: str
    cwd: str
    python: str = sys.executable
    env: dict[str, str] = field(default_factory=dict)
    resume: bool = False
    attempt: int = 1

    def command(self) -> list[str]:
        cmd = [self.python, "-m", "pytest", *self.pytest_args, "--shard", f"{self.index}/{self.count}",
               "--sweep-id", self.sweep_id, "--report-dir", self.report_dir]
        return cmd + (["--resume"] if self.resume and "--resume" not in self.pytest_args else [])

    def log_path(self) -> Path:
        return Path(self.log_dir) / f"shard-{self.index}-attempt-{self.attempt}.log"

    def __call__(self) -> dict[str, Any]:
        """Run the shard's pytest; return {index, returncode, outcome, run_json, seconds, log, usage_error}, or
        raise :class:`ShardFailed` (so that the scheduler, too, sees the job fail). A usage error is returned,
        not raised: it must stop the sweep, not be retried."""
        started = time.time()
        log = self.log_path()
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as out:
            out.write(f"$ {shlex.join(self.command())}\n")
            out.flush()
            rc = subprocess.run(self.command(), check=False, cwd=self.cwd, env={**os.environ, **self.env}, stdout=out,
                                stderr=subprocess.STDOUT).returncode
        where = f"shard {self.index}/{self.count} (attempt {self.attempt}, log {log})"
        result = {"index": self.index, "returncode": rc, "outcome": RESULT_CODES.get(rc, "usage error"),
                  "attempt": self.attempt, "run_json": None, "seconds": time.time() - started, "log": str(log),
                  "usage_error": f"{where}: pytest usage error: {_last_line(log)}" if rc == 4 else None}
        if rc == 4:
            return result
        if rc not in RESULT_CODES:
            cause = f"killed by signal {-rc}" if rc < 0 else f"pytest exit code {rc}"
            raise ShardFailed(f"{where}: {cause}: {_last_line(log)}")
        run_json = _newest_run_json(Path(self.report_dir), since=started)
        if run_json is None and rc != 5:
            raise ShardFailed(f"{where}: pytest exit code {rc} but no run JSON in {self.report_dir}")
        return {**result, "run_json": str(run_json) if run_json else None}

    def retry(self) -> ShardJob:
        """The same shard again, continuing from its journal (``--resume``)."""
        return dataclasses.replace(self, resume=True, attempt=self.attempt + 1)

    def checkpoint(self, *args: Any, **kwargs: Any):
        import submitit
        return submitit.helpers.DelayedSubmission(self.retry())


def _last_line(log: Path) -> str:
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1][:300] if len(lines) > 1 else "(no output)"


def _newest_run_json(report_dir: Path, since: float) -> Path | None:
    runs = [p for p in report_dir.glob("run-*.json") if p.stat().st_mtime >= since - 1]
    return max(runs, key=lambda p: p.stat().st_mtime) if runs else None


# --- backends -------------------------------------------------------------------------------------------------
class Handle(Protocol):
    def done(self) -> bool: ...
    def result(self) -> dict[str, Any]: ...
    def cancel(self) -> Any: ...


@dataclass
class Resources:
    """What each shard's job asks the scheduler for."""

    gpus_per_job: int = 0
    cpus_per_job: int | None = None
    time_limit_min: int = 24 * 60
    partition: str | None = None
    array_parallelism: int | None = None       # SLURM: at most this many shards run at once
    slurm_args: dict[str, str] = field(default_factory=dict)   # further sbatch options, e.g. account, qos
    ray_address: str | None = None


class SubmititBackend:
    """SLURM (``cluster="slurm"``) or this machine (``cluster="local"``) through submitit."""

    def __init__(self, folder: Path, cluster: str, res: Resources):
        try:
            import submitit
        except ImportError:
            raise LaunchError(f"--backend {cluster} needs submitit: pip install 'knowedit-harness[cluster]' "
                              "(or pip install submitit)") from None
        try:
            self.executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
        except RuntimeError as e:               # e.g. no srun: not on a SLURM login node
            raise LaunchError(f"--backend {cluster}: {str(e).splitlines()[0]} (run harness launch on the cluster's "
                              "login node, or use --backend local or ray)") from None
        params: dict[str, Any] = {"name": "harness-shard", "timeout_min": res.time_limit_min,
                                  "gpus_per_node": res.gpus_per_job}
        if cluster == "slurm":
            params.update(cpus_per_task=res.cpus_per_job, slurm_partition=res.partition,
                          slurm_array_parallelism=res.array_parallelism,
                          slurm_additional_parameters=res.slurm_args or None)
        self.executor.update_parameters(**{k: v for k, v in params.items() if v is not None})

    def submit_all(self, jobs: Sequence[ShardJob]) -> list[Handle]:
        with self.executor.batch():         # one SLURM job array (throttled by array parallelism)
            handles = [self.executor.submit(job) for job in jobs]
        return handles

    def submit(self, job: ShardJob) -> Handle:
        return self.executor.submit(job)

    def close(self) -> None:
        pass


def _run_shard(job: ShardJob) -> dict[str, Any]:
    return job()


class _RayHandle:
    def __init__(self, ray, ref):
        self.ray, self.ref = ray, ref

    def done(self) -> bool:
        ready, _ = self.ray.wait([self.ref], timeout=0)
        return bool(ready)

    def result(self) -> dict[str, Any]:
        return self.ray.get(self.ref)

    def cancel(self) -> None:
        self.ray.cancel(self.ref, force=True)


class RayBackend:
    """One Ray task per shard, on ``ray.init(address=...)`` (a local instance when no address is given)."""

    def __init__(self, res: Resources):
        try:
            import ray
        except ImportError:
            raise LaunchError("--backend ray needs ray: pip install 'knowedit-harness[cluster]' "
                              "(or pip install 'ray[default]')") from None
        self.ray = ray
        self.started = not ray.is_initialized()
        local = {} if res.ray_address else {"object_store_memory": 256 * 2**20, "include_dashboard": False}
        if self.started:
            ray.init(address=res.ray_address, log_to_driver=False, **local)
        self.task = ray.remote(num_gpus=res.gpus_per_job, num_cpus=res.cpus_per_job or 1, max_retries=0)(_run_shard)

    def submit_all(self, jobs: Sequence[ShardJob]) -> list[Handle]:
        return [self.submit(job) for job in jobs]

    def submit(self, job: ShardJob) -> Handle:
        return _RayHandle(self.ray, self.task.remote(job))

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()


def make_backend(name: str, folder: Path, res: Resources):
    if name == "ray":
        return RayBackend(res)
    if name in ("local", "slurm"):
        return SubmititBackend(folder, name, res)
    raise LaunchError(f"--backend {name}: unknown backend; use one of {', '.join(BACKENDS)}")


# --- the sweep ------------------------------------------------------------------------------------------------
@dataclass
class SweepOutcome:
    results: dict[int, dict[str, Any]] = field(default_factory=dict)   # shard index -> ShardJob result
    failures: dict[int, str] = field(default_factory=dict)             # shard index -> last error, retries spent
    retries: int = 0


def run_shards(backend, jobs: Sequence[ShardJob], max_retries: int = 2, poll_s: float = 2.0,
               progress: bool = True) -> SweepOutcome:
    """Submit every shard, wait with a progress bar, resubmit a failed shard (with ``--resume``) up to
    ``max_retries`` times. A usage error cancels the sweep and is raised as a :class:`LaunchError`."""
    from tqdm import tqdm

    outcome = SweepOutcome()
    running = dict(zip((j.index for j in jobs), zip(jobs, backend.submit_all(jobs))))
    bar = tqdm(total=len(jobs), unit="shard", desc=f"sweep {jobs[0].sweep_id}" if jobs else "sweep",
               disable=not progress, file=sys.stderr)
    try:
        while running:
            for index, (job, handle) in list(running.items()):
                if not handle.done():
                    continue
                del running[index]
                try:
                    result = handle.result()
                except Exception as e:  # noqa: BLE001 - a killed, crashed or preempted shard: retry it
                    reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
                    if job.attempt > max_retries:
                        outcome.failures[index] = f"{reason} (gave up after {job.attempt} attempts)"
                        bar.update(1)
                        continue
                    bar.write(f"shard {index}/{job.count} failed ({reason}); resubmitting with --resume")
                    outcome.retries += 1
                    retry = job.retry()
                    running[index] = (retry, backend.submit(retry))
                    continue
                if result.get("usage_error"):
                    raise LaunchError(result["usage_error"])
                outcome.results[index] = result
                bar.update(1)
                bar.set_postfix(failed=len(outcome.failures), retried=outcome.retries)
            if running:
                time.sleep(poll_s)
    finally:
        for _, handle in running.values():     # interrupted (Ctrl-C, usage error): leave nothing running
            handle.cancel()
        bar.close()
    return outcome


def _check_pytest_args(args: Sequence[str]) -> list[str]:
    args = list(args[1:] if args and args[0] == "--" else args)
    for a in args:
        if a.split("=", 1)[0] in OWN_OPTIONS:
            raise LaunchError(f"{a}: harness launch sets {', '.join(OWN_OPTIONS)} for each shard; drop it "
                              "(the shards' reports go under --out)")
    if not args:
        raise LaunchError("no pytest arguments; pass them after --, e.g. harness launch --shards 4 -- suites/ "
                          "--editor rome")
    return args


def _gpu_env(backend: str, index: int, gpus_per_job: int) -> dict[str, str]:
    """The local backend runs every shard on this machine: give shard I its own GPUs (round robin)."""
    if backend != "local" or gpus_per_job <= 0:
        return {}
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        devices = [d for d in visible.split(",") if d.strip()]
    else:
        import torch
        devices = [str(i) for i in range(torch.cuda.device_count())]
    if len(devices) < gpus_per_job:
        raise LaunchError(f"--gpus-per-job {gpus_per_job}: this machine has {len(devices)} visible GPU(s)")
    first = (index - 1) * gpus_per_job
    return {"CUDA_VISIBLE_DEVICES": ",".join(devices[(first + k) % len(devices)] for k in range(gpus_per_job))}


def shard_jobs(pytest_args: Sequence[str], shards: int, out: Path, sweep_id: str, backend: str = "local",
               gpus_per_job: int = 0, cwd: str | None = None) -> list[ShardJob]:
    """One :class:`ShardJob` per shard, reports under ``out/shard-I``, logs under ``out/logs``."""
    if shards < 1:
        raise LaunchError(f"--shards {shards}: need at least 1")
    env = {k: os.environ[k] for k in ENV_PASSED if k in os.environ}
    return [ShardJob(index=i, count=shards, sweep_id=sweep_id, pytest_args=list(pytest_args),
                     report_dir=str((out / f"shard-{i}").resolve()), log_dir=str((out / "logs").resolve()),
                     cwd=cwd or os.getcwd(), env={**env, **_gpu_env(backend, i, gpus_per_job)})
            for i in range(1, shards + 1)]


def new_sweep_id() -> str:
    return datetime.now().strftime("sweep-%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:4]


# --- command line ---------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``harness launch`` arguments (harness/cli.py registers the subcommand with these)."""
    p.add_argument("--backend", choices=BACKENDS, default="local",
                   help="slurm (submitit), ray, or local (submitit's LocalExecutor on this machine)")
    p.add_argument("--shards", type=int, required=True, metavar="N", help="number of shards (one job each)")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="sweep folder: shard-I/ reports, logs/, merged.json (default reports/sweeps/SWEEP_ID)")
    p.add_argument("--sweep-id", default=None, help="sweep id (default: sweep-<time>-<random>)")
    p.add_argument("--max-retries", type=int, default=2, help="resubmissions of a failed shard (default 2)")
    p.add_argument("--gpus-per-job", type=int, default=0, help="GPUs per shard (SLURM gpus_per_node, Ray num_gpus)")
    p.add_argument("--cpus-per-job", type=int, default=None, help="CPUs per shard (SLURM cpus_per_task, Ray num_cpus)")
    p.add_argument("--time-limit", type=int, default=24 * 60, metavar="MIN", help="per-shard time limit, minutes")
    p.add_argument("--partition", default=None, help="SLURM partition")
    p.add_argument("--array-parallelism", type=int, default=None, metavar="K",
                   help="SLURM: at most K shards of the job array run at once")
    p.add_argument("--slurm-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="further sbatch option, e.g. account=abc or qos=high (repeatable)")
    p.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="Ray cluster address (ray.init(address=...)); default: start a local Ray instance")
    p.add_argument("--poll", type=float, default=5.0, metavar="S", help="seconds between status checks")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("pytest_args", nargs=argparse.REMAINDER, metavar="-- PYTEST_ARGS",
                   help="arguments for each shard's pytest (after --)")


def _resources(args: argparse.Namespace) -> Resources:
    slurm_args = {}
    for kv in args.slurm_arg:
        key, sep, value = kv.partition("=")
        if not sep or not key:
            raise LaunchError(f"--slurm-arg {kv}: expected KEY=VALUE, e.g. --slurm-arg account=abc")
        slurm_args[key] = value
    return Resources(gpus_per_job=args.gpus_per_job, cpus_per_job=args.cpus_per_job, time_limit_min=args.time_limit,
                     partition=args.partition, array_parallelism=args.array_parallelism, slurm_args=slurm_args,
                     ray_address=args.ray_address)


def run(args: argparse.Namespace) -> int:
    """``harness launch``: exit 0 all shards passed, 1 some tests failed (recorded), 3 shards failed after their
    retries (a partial merge is written), 2 bad input."""
    from .merge import merge_files, write_merged

    pytest_args = _check_pytest_args(args.pytest_args)
    sweep_id = args.sweep_id or new_sweep_id()
    out = args.out or Path("reports") / "sweeps" / sweep_id
    jobs = shard_jobs(pytest_args, args.shards, out, sweep_id, args.backend, args.gpus_per_job)
    backend = make_backend(args.backend, out / "submitit", _resources(args))
    try:
        outcome = run_shards(backend, jobs, args.max_retries, args.poll, progress=not args.no_progress)
    except KeyboardInterrupt:
        print(f"harness launch: interrupted; the running shards were cancelled (finished shards' run JSONs are in "
              f"{out}: harness merge --allow-missing)", file=sys.stderr)
        return 130
    finally:
        backend.close()
    files = [r["run_json"] for _, r in sorted(outcome.results.items()) if r["run_json"]]
    for index, reason in sorted(outcome.failures.items()):
        print(f"harness launch: shard {index}/{args.shards} failed: {reason}", file=sys.stderr)
    if not files:
        print(f"harness launch: no shard wrote a run JSON (logs in {out / 'logs'})", file=sys.stderr)
        return 3 if outcome.failures else 0
    merged, report = merge_files(files, allow_missing=bool(outcome.failures))
    written = write_merged(merged, out / "merged.json")
    for line in report.lines():
        print(line)
    print(f"merged {len(merged['records'])} records from {len(files)} shard(s) "
          f"({outcome.retries} resubmission(s)): {', '.join(map(str, written))}")
    if outcome.failures:
        return 3
    return 1 if any(r["returncode"] == 1 for r in outcome.results.values()) else 0

