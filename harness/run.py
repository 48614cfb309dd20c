"""One benchmark run: thresholds, records, machine info and the run JSON (``harness.schema.SCHEMA_VERSION``;
docs/run-json.md)."""
from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import secrets
import socket
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .metrics.registry import summarize
from .schema import SCHEMA_VERSION
from .thresholds import Thresholds


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "item"):  # numpy / torch scalars
        return _jsonable(x.item())
    return x


def machine_info(device: str | None = None, dtype: str | None = None) -> dict[str, Any]:
    import torch
    import transformers

    info: dict[str, Any] = {
        "hostname": socket.gethostname(), "platform": platform.platform(), "python": platform.python_version(),
        "torch": str(torch.__version__), "transformers": str(transformers.__version__), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "device": device, "dtype": dtype,
        "gpu_name": None, "cuda": None, "driver": None,
        "memory_note": "peak_rss_mb is the process's peak resident set size so far (CPU); "
                       "peak_gpu_mb is torch.cuda.max_memory_allocated during the record (GPU)",
    }
    if torch.cuda.is_available():
        info["gpu_name"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
        info["gpu_count"] = torch.cuda.device_count()
        try:
            import subprocess
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0]
        except Exception:  # noqa: BLE001 - the driver version is informative only
            pass
    return info


def new_run_id() -> str:
    """A run id that two concurrent runs cannot share: local time, process id and 32 random bits."""
    return f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{secrets.token_hex(4)}"


def default_file_mode() -> int:
    """The mode a plainly created file gets: ``0o666`` less the process's umask (``mkstemp`` alone gives 0600, which
    a shared report folder or a web server cannot read)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def _write_temp(path: Path, text: str) -> str:
    """``text`` in a unique temporary file beside ``path`` (fsync'd, usual mode); returns its name. A failure
    leaves no temporary file behind."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), default_file_mode())
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return tmp


def atomic_write_texts(files: dict[Path, str]) -> list[Path]:
    """Write several files as one: every temporary file is written (and fsync'd) first, and only then are they
    renamed into place, in order. If any write fails, none is published; if a rename fails, the files already
    renamed that did not exist before are removed again. Each file gets the usual mode (``default_file_mode``)."""
    paths = [Path(p) for p in files]
    temps: list[str] = []
    try:
        for path, text in zip(paths, files.values()):
            temps.append(_write_temp(path, text))
    except BaseException:
        for tmp in temps:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise
    published: list[Path] = []
    try:
        for path, tmp in zip(paths, temps):
            existed = path.exists()
            os.replace(tmp, path)
            if not existed:
                published.append(path)
    except BaseException:
        for tmp in temps:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        for path in published:
            with contextlib.suppress(OSError):
                os.unlink(path)
        raise
    return paths


def atomic_write_text(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a unique temporary file in the same folder and an atomic rename, so a
    reader never sees a half-written file and concurrent writers never share a temporary name. The file gets the
    usual mode (``0o666`` less the umask), as a plain ``open`` would give it."""
    return atomic_write_texts({Path(path): text})[0]


@dataclass
class BenchmarkRun:
    """Collects records (from this process or from xdist workers) and writes the run JSON."""

    config: dict[str, Any] = field(default_factory=dict)
    thresholds: Thresholds = field(default_factory=Thresholds)
    records: list[dict[str, Any]] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)
    started: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    run_id: str = field(default_factory=new_run_id)

    def add(self, record: dict[str, Any]) -> None:
        self.records.append(record)

    def summary(self) -> list[dict[str, Any]]:
        """Per (suite, editor): outcome counts and every metric aggregated as the metric registry says (mean or
        median with a seeded 95% bootstrap interval over cases, and n)."""
        return [g.to_json() for g in summarize(sorted(self.records, key=lambda r: r.get("nodeid", "")))]

    def to_json(self, model: dict | None = None, machine: dict | None = None) -> dict[str, Any]:
        finished = datetime.now(timezone.utc)
        records = sorted(self.records, key=lambda r: r.get("nodeid", ""))
        model = model or next((r.get("model") for r in records if r.get("model")), None) or {}
        machine = machine or next((r.get("machine") for r in records if r.get("machine")), None) or {}
        return _jsonable({
            "schema_version": SCHEMA_VERSION, "run_id": self.run_id, "started": self.started,
            "finished": finished.isoformat(timespec="seconds"),
            "duration_s": (finished - datetime.fromisoformat(self.started)).total_seconds(),
            "model": model, "machine": machine,
            "config": {**self.config, "thresholds": asdict(self.thresholds)},
            "provenance": self.provenance or {"error": "not collected (a BenchmarkRun written without the plugin)"},
            "records": [{k: v for k, v in r.items() if k not in ("model", "machine")} for r in records],
            "summary": self.summary(),
        })

    def write(self, report_dir: Path, data: dict[str, Any] | None = None, **kw) -> Path:
        """Write ``run-<id>.json`` and refresh ``latest.json`` as one (``atomic_write_texts``: both written before
        either is renamed, so a full disk never leaves a new run file beside an older latest.json); returns the run
        file."""
        report_dir = Path(report_dir)
        report_dir.mkdir(parents=True, exist_ok=True)
        text = json.dumps(data if data is not None else self.to_json(**kw), indent=1)
        path, _ = atomic_write_texts({report_dir / f"run-{self.run_id}.json": text, report_dir / "latest.json": text})
        return path


def fallback_report_dir() -> Path:
    """A folder that can be written when the report dir cannot: a fresh one under the system temp dir."""
    return Path(tempfile.mkdtemp(prefix="knowedit-harness-reports-"))


class Record:
    """What one test measured: metrics (with their protocols), phase timings and memory. The plugin attaches it
    to the test report, so it travels from xdist workers to the controller with the report."""

    def __init__(self, suite: str, editor: str | None, case_id: str | None, timer, subject: str | None = None):
        self.data: dict[str, Any] = {"suite": suite, "editor": editor, "case_id": case_id, "subject": subject,
                                     "metrics": {}, "protocols": {}, "info": {}}
        self.timer = timer

    def phase(self, name: str):
        return self.timer.phase(name)

    def add(self, metrics: dict[str, Any], protocols: dict[str, str] | None = None, **protocol_for_all) -> None:
        self.data["metrics"].update(_jsonable(metrics))
        for k in metrics:
            if protocols and k in protocols:
                self.data["protocols"][k] = protocols[k]
            elif protocol_for_all.get("protocol"):
                self.data["protocols"][k] = protocol_for_all["protocol"]

    def note(self, **info: Any) -> None:
        self.data["info"].update(_jsonable(info))

    def finish(self) -> dict[str, Any]:
        self.data["timings"] = dict(self.timer.seconds)
        self.data["memory"] = self.timer.memory()
        return self.data
