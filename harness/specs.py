"""The metric specs that live beside their protocols (WILD, generation, KnowEdit, sequential retention), registered
in one place. ``metrics/registry.py`` cannot import them (metrics sit below protocols), so every entry point that
ranks, compares or reports runs calls :func:`register_builtin_specs` first: the pytest plugin at configure time and
the ``harness`` CLI before any command. Without it a plain ``harness compare`` would show these metrics but never
compare or rank them."""
from __future__ import annotations

import importlib

from .metrics import generation, knowedit, wild
from .metrics.registry import REGISTRY, MetricRegistry, MetricSpec


def builtin_specs() -> tuple[dict, ...]:
    """The protocol-owned specs, as the dicts their modules declare."""
    seq_protocol = importlib.import_module("harness.protocols.sequential")  # the package re-exports the function
    return (*wild.METRIC_SPECS, *generation.METRIC_SPECS, *knowedit.METRIC_SPECS, *seq_protocol.METRIC_SPECS)


def register_builtin_specs(registry: MetricRegistry = REGISTRY) -> MetricRegistry:
    """Register every built-in spec not yet registered (idempotent); returns the registry."""
    for spec in builtin_specs():
        known = registry.get(spec["name"])
        if known is None or not known.registered:
            registry.register(MetricSpec(**spec))
    return registry
