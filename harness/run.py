"""One benchmark run: thresholds, records, machine info and the run JSON (schema_version 1)."""
from __future__ import annotations

import json
import math
import os
import platform
import socket
import statistics
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .thresholds import Thresholds

SCHEMA_VERSION = 1


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


@dataclass
class BenchmarkRun:
    """Collects records (from this process or from xdist workers) and writes the run JSON."""

    config: dict[str, Any] = field(default_factory=dict)
    thresholds: Thresholds = field(default_factory=Thresholds)
    records: list[dict[str, Any]] = field(default_factory=list)
    started: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    run_id: str = field(default_factory=lambda: datetime.now().strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:4])

    def add(self, record: dict[str, Any]) -> None:
        self.records.append(record)

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per editor and suite: counts and means of scalar metrics and timings."""
        out: dict[str, dict[str, Any]] = {}
        groups: dict[tuple[str, str], list[dict]] = {}
        for r in self.records:
            groups.setdefault((r.get("editor") or "-", r.get("suite") or "-"), []).append(r)
        for (editor, suite), recs in sorted(groups.items()):
            s: dict[str, Any] = {"suite": suite, "n": len(recs),
                                 "passed": sum(r["outcome"] == "passed" for r in recs),
                                 "failed": sum(r["outcome"] in ("failed", "error") for r in recs)}
            keys = sorted({k for r in recs for k, v in r.get("metrics", {}).items()
                           if isinstance(v, (int, float)) and not isinstance(v, bool)})
            for k in keys:
                vals = [r["metrics"][k] for r in recs if isinstance(r.get("metrics", {}).get(k), (int, float))]
                vals = [v for v in vals if math.isfinite(v)]
                if vals:
                    s[k] = statistics.fmean(vals)
            for k in sorted({k for r in recs for k in r.get("timings", {})}):
                vals = [r["timings"][k] for r in recs if k in r.get("timings", {})]
                s[f"time_{k}_s"] = statistics.fmean(vals)
            out[f"{editor}" if suite == "single_edit" else f"{editor}/{suite}"] = s
        return out

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
            "records": [{k: v for k, v in r.items() if k not in ("model", "machine")} for r in records],
            "summary": self.summary(),
        })

    def write(self, report_dir: Path, **kw) -> Path:
        """Write ``run-<id>.json`` and refresh ``latest.json``; returns the run file."""
        report_dir = Path(report_dir)
        report_dir.mkdir(parents=True, exist_ok=True)
        data = self.to_json(**kw)
        path = report_dir / f"run-{self.run_id}.json"
        text = json.dumps(data, indent=1)
        path.write_text(text)
        latest = report_dir / "latest.json"
        tmp = latest.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(latest)
        return path


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
