"""The GPU path, proven in one run: single edits of ROME, MEMIT and AlphaEdit on the embedded model with
``--device cuda`` in fp32 and bf16, the run JSON checked for CUDA timings and peak GPU memory, and the ratio to a
CPU run of the same cases printed.

    PYTHONPATH=$PWD python benchmarks/gpu_check.py [--data-dir ../shared/data] [--cases 2] [--model smollm2-135m]
        [--out /tmp/gpu-check] [--skip-cpu]

For each (editor, dtype) it runs ``pytest suites/test_single_edit.py --editor E --device cuda --dtype D --cases N``
(``-n G`` when there are G > 1 GPUs and pytest-xdist is installed), reads ``latest.json`` from its report dir and
checks: every record passed or ended with a verdict (no crash), ``machine.gpu_name`` is set, every record's
``memory`` holds ``peak_gpu_mb`` (the harness's PhaseTimer reports it only when it timed the phases with CUDA
events) and ``timings.edit`` > 0. Then one CPU run (fp32, one thread) of the same cases gives the ratio per phase.
Exit status 0 when every check held; the table and the failures are printed. Needs a CUDA machine; on a machine
without one it says so and exits 2.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

EDITORS = ("rome", "memit", "alphaedit")
DTYPES = ("float32", "bfloat16")
PHASES = ("edit", "evaluate", "perplexity")


def run_suite(editor: str, device: str, dtype: str, args, out: Path, extra: list[str]) -> tuple[int, dict | None, float]:
    report = out / f"{editor}-{device}-{dtype}"
    cmd = [sys.executable, "-m", "pytest", "suites/test_single_edit.py", "-q", "-p", "no:cacheprovider",
           "--editor", editor, "--device", device, "--dtype", dtype, "--cases", str(args.cases),
           "--model", args.model, "--report-dir", str(report), "--no-wild", "--no-fluency", *extra]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    env = dict(os.environ)
    if device == "cpu":
        env["OMP_NUM_THREADS"] = "1"
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
                          check=False)
    wall = time.perf_counter() - t0
    (out / f"{report.name}.log").write_text(" ".join(cmd) + "\n\n" + proc.stdout + proc.stderr)
    latest = report / "latest.json"
    return proc.returncode, json.loads(latest.read_text()) if latest.is_file() else None, wall


def phase_means(run: dict) -> dict[str, float]:
    recs = [r for r in run.get("records", []) if r.get("timings")]
    return {p: statistics.fmean(r["timings"].get(p, 0.0) for r in recs) for p in PHASES} if recs else {}


def check(run: dict | None, rc: int, name: str) -> list[str]:
    if run is None:
        return [f"{name}: no run JSON (pytest exit {rc}; see the log)"]
    problems = []
    if not (run.get("machine") or {}).get("gpu_name"):
        problems.append(f"{name}: machine.gpu_name is empty (not a CUDA run?)")
    recs = run.get("records", [])
    if not recs:
        problems.append(f"{name}: no records")
    for r in recs:
        rid = r.get("nodeid", "?")
        if r.get("outcome") not in ("passed", "failed"):
            problems.append(f"{name}: {rid} outcome {r.get('outcome')!r} ({str(r.get('message') or '')[:200]})")
        if "peak_gpu_mb" not in (r.get("memory") or {}):
            problems.append(f"{name}: {rid} has no memory.peak_gpu_mb (phases not timed with CUDA events)")
        if not (r.get("timings") or {}).get("edit", 0) > 0:
            problems.append(f"{name}: {rid} has no edit timing")
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--cases", type=int, default=2)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--editors", nargs="+", default=list(EDITORS))
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES))
    ap.add_argument("--out", type=Path, default=Path("/tmp/gpu-check"))
    ap.add_argument("--skip-cpu", action="store_true", help="no CPU run (no ratios)")
    args = ap.parse_args()

    import torch
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU machine")
        return 2
    n_gpu = torch.cuda.device_count()
    extra: list[str] = []
    if n_gpu > 1:
        try:
            import xdist  # noqa: F401
            extra = ["-n", str(n_gpu)]
        except ImportError:
            pass
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"{torch.cuda.get_device_name(0)} x{n_gpu}, torch {torch.__version__}, {args.model}, {args.cases} cases "
          f"{'(' + ' '.join(extra) + ')' if extra else ''}", flush=True)

    problems: list[str] = []
    rows = []
    for editor in args.editors:
        cpu = None
        if not args.skip_cpu:
            rc, run, wall = run_suite(editor, "cpu", "float32", args, args.out, [])
            cpu = phase_means(run) if run else None
            if run is None:
                problems.append(f"{editor} cpu: no run JSON (pytest exit {rc})")
        for dtype in args.dtypes:
            name = f"{editor} cuda {dtype}"
            rc, run, wall = run_suite(editor, "cuda", dtype, args, args.out, extra)
            problems += check(run, rc, name)
            means = phase_means(run) if run else {}
            peak = max(((r.get("memory") or {}).get("peak_gpu_mb", 0) for r in (run or {}).get("records", [])),
                       default=0)
            rows.append((name, means, peak, cpu, wall))
            print(f"  {name}: exit {rc}, {wall:.0f} s wall", flush=True)

    print("\n| run | edit s | evaluate s | perplexity s | peak GPU MB | CPU / GPU (edit, evaluate, perplexity) |")
    print("|---|---|---|---|---|---|")
    for name, means, peak, cpu, _ in rows:
        ratios = ", ".join(f"{cpu[p] / means[p]:.1f}x" if cpu and means.get(p) else "-" for p in PHASES)
        print(f"| {name} | " + " | ".join(f"{means.get(p, float('nan')):.3f}" for p in PHASES)
              + f" | {peak:.0f} | {ratios} |")
    print("\nCPU: fp32, one thread (OMP_NUM_THREADS=1), wall seconds per case as the run JSON records them")
    if problems:
        print("\nFAILED checks:\n  " + "\n  ".join(problems))
        return 1
    print("\nall checks held: CUDA-event timings and peak GPU memory in every record")
    return 0


if __name__ == "__main__":
    sys.exit(main())
