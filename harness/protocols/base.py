"""The result of a protocol."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Measurement:
    """What one protocol measured: ``metrics`` (name -> value, as in the run JSON), ``protocols`` (name -> how it
    was measured) and ``info`` (what was edited and how: not compared across runs)."""

    metrics: dict[str, Any]
    protocols: dict[str, str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
