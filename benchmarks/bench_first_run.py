"""The main job as a newcomer meets it, phase by phase: a fresh clone, an empty cache, no data dir, `tox -e bench`.

    python benchmarks/bench_first_run.py [--repo .] [--keep DIR] [--no-save] [-- extra pytest args]

Clones the repository's committed HEAD into a temporary folder, runs `tox -e bench` there twice with
HARNESS_CACHE_DIR pointing at an empty folder (cold: installs, de-quantizing, sampling text, key statistics) and
then again at the same folder (warm: everything cached, the tox environment built), and prints the wall time of each
phase:

- install: tox creating the environment and installing the harness, torch and the embedded model's wheel (the time
  before pytest starts);
- the harness's long steps, read from its progress lines (`harness: <step>: done in ...`, printed on the terminal
  despite pytest's capture; under CI=1 they are one line per step): loading the model, sampling text, key
  statistics, the unedited model's perplexity;
- tests: the rest of pytest's time (edits, scoring, perplexity after each edit, reports);
- total.

The figures are compared with the last saved run and with the recorded figures of earlier releases in
`benchmarks/results/first-run.json` (ratio = this run / that one), and saved there (`--no-save` leaves the file).
Run it on a quiet machine: the time is wall time.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "first-run.json"
STEP_DONE = re.compile(r"harness: (?P<step>.+?): done in (?:(?P<min>\d+) min )?(?P<sec>[\d.]+) s")
STEPS = {"loading model": "load", "sampling text": "sampling", "key statistics": "statistics",
         "perplexity of the unedited model": "first perplexity"}


def _phase(step: str) -> str:
    return next((name for prefix, name in STEPS.items() if step.startswith(prefix)), step)


def run_bench(clone: Path, cache: Path, extra: list[str]) -> dict:
    """One `tox -e bench` in ``clone`` with ``cache`` as HARNESS_CACHE_DIR: the phases' wall seconds."""
    env = {**os.environ, "HARNESS_CACHE_DIR": str(cache), "CI": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("HARNESS_DATA_DIR", None)
    t0 = time.perf_counter()
    pytest_start = None
    phases: dict[str, float] = {}
    lines = []
    proc = subprocess.Popen([sys.executable, "-m", "tox", "-e", "bench", "--", "-p", "no:cacheprovider", *extra],
                            cwd=clone, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        print(line, end="", flush=True)
        if pytest_start is None and ("test session starts" in line or line.startswith("harness: ")):
            pytest_start = time.perf_counter()
        m = STEP_DONE.search(line)
        if m:
            seconds = int(m["min"] or 0) * 60 + float(m["sec"])
            name = _phase(m["step"])
            phases[name] = phases.get(name, 0.0) + seconds
    rc = proc.wait()
    total = time.perf_counter() - t0
    if rc != 0:
        print(f"bench_first_run: tox -e bench exited {rc}", file=sys.stderr)
    install = (pytest_start or time.perf_counter()) - t0
    out = {"install": round(install, 1), **{k: round(v, 1) for k, v in phases.items()}}
    out["tests"] = round(total - install - sum(phases.values()), 1)
    out["total"] = round(total, 1)
    out["exit"] = rc
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", default=str(Path(__file__).resolve().parents[1]), help="repository to clone (HEAD)")
    ap.add_argument("--keep", default=None, help="clone and cache into this folder and keep them")
    ap.add_argument("--no-save", action="store_true", help="do not write benchmarks/results/first-run.json")
    ap.add_argument("extra", nargs="*", help="extra pytest arguments after --")
    args = ap.parse_args()

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="first-run-"))
    clone, cache = work / "clone", work / "cache"
    shutil.rmtree(clone, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)
    subprocess.run(["git", "clone", "--quiet", args.repo, str(clone)], check=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=clone, capture_output=True, text=True,
                            check=True).stdout.strip()
    cache.mkdir(parents=True)
    try:
        cold = run_bench(clone, cache, args.extra)
        warm = run_bench(clone, cache, args.extra)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    saved = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    earlier = {**saved.get("releases", {}), **({"last run": saved["last"]} if "last" in saved else {})}
    phases = list(dict.fromkeys([*cold, *warm]))
    phases.remove("exit")
    print(f"\nmain job, tox -e bench, commit {commit}, {os.cpu_count()} cores (wall seconds)")
    header = f"{'phase':<18}{'cold':>9}{'warm':>9}"
    for name in earlier:
        header += f"{'cold/' + name:>22}"
    print(header)
    for p in phases:
        row = f"{p:<18}{cold.get(p, 0):>9.1f}{warm.get(p, 0):>9.1f}"
        for ref in earlier.values():
            before = ref.get("cold", {}).get(p)
            row += f"{(f'{cold.get(p, 0) / before:.2f}x' if before else '-'):>22}"
        print(row)
    if not args.no_save:
        saved["previous"] = saved.get("last")
        saved["last"] = {"commit": commit, "cores": os.cpu_count(), "cold": cold, "warm": warm,
                         "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(saved, indent=1) + "\n")
    return 0 if cold["exit"] == 0 and warm["exit"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
