"""Hooks that other plugins (or a project's conftest.py) implement to extend a benchmark run, as pytest-benchmark
does for its JSON and machine info. Registered by the harness plugin through ``pytest_addhooks``."""
from __future__ import annotations

from typing import Any

import pluggy
import pytest

hookspec = pluggy.HookspecMarker("pytest")


@hookspec
def pytest_harness_update_run_json(config: pytest.Config, run: dict[str, Any]) -> None:
    """Change the run JSON in place just before it is validated and written (add fields under ``run["extra"]``,
    annotate records, ...). Called once per session on the controller (not on xdist workers)."""


@hookspec
def pytest_harness_register_metrics(registry: Any) -> None:
    """Add metric specifications (``registry.register(MetricSpec(...))``) for metrics a plugin's suites record, so
    that the terminal table, HTML report, leaderboard and compare know their direction, unit and aggregation.
    Called once at configure time."""
