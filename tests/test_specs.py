"""The protocol-owned metric specs (WILD, generation, KnowEdit, sequential retention) are registered wherever runs
are ranked or compared: in a fresh ``harness`` CLI process, not only inside pytest."""
from __future__ import annotations

import json
import subprocess
import sys

from harness.metrics.registry import MetricRegistry
from harness.specs import builtin_specs, register_builtin_specs
from tests.test_report import _many_cases


def test_register_builtin_specs_is_idempotent_and_complete():
    registry = register_builtin_specs(register_builtin_specs(MetricRegistry()))
    names = {spec["name"] for spec in builtin_specs()}
    assert {"wild_rewrite_em", "wild_locality"} <= names
    assert all(registry.get(n) is not None and registry.get(n).registered for n in names)


def test_cli_compares_a_wild_metric_in_a_fresh_process(tmp_path):
    base = _many_cases()
    worse = _many_cases()
    for i, (b, w) in enumerate(zip(base["records"], worse["records"])):
        b["metrics"]["wild_rewrite_em"] = 1.0
        w["metrics"]["wild_rewrite_em"] = 0.0 if i % 3 else 1.0           # 8 of 12 generated answers lost
    paths = []
    for name, run in (("b.json", base), ("r.json", worse)):
        (tmp_path / name).write_text(json.dumps(run), encoding="utf-8")
        paths.append(str(tmp_path / name))
    proc = subprocess.run([sys.executable, "-m", "harness.cli", "compare", *paths],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    row = next(line for line in proc.stdout.splitlines() if "| wild_rewrite_em |" in line)
    assert "REGRESSED" in row, proc.stdout
