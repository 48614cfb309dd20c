"""Reports built from the run JSON written by the harness pytest plugin.

Public API (imported lazily, so that e.g. ``harness compare`` does not load matplotlib):

* :func:`render_html`, :func:`write_html` (``harness.report.html``): one self-contained HTML page per run.
* :func:`load_runs`, :func:`leaderboard`, :func:`write_leaderboard` (``harness.report.leaderboard``).
* :func:`compare`, :class:`CompareResult` (``harness.report.compare``): regressions against a baseline run.

This module also holds the small helpers the three share for reading run dicts (schema_version 1).
"""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined

SCHEMA_VERSION = 1
TEMPLATES_DIR = Path(__file__).with_name("templates")
_RUN_HINT = "pass a run JSON written by the harness pytest plugin (reports/run-<id>.json)"

_LAZY = {
    "render_html": "html",
    "write_html": "html",
    "load_runs": "leaderboard",
    "leaderboard": "leaderboard",
    "write_leaderboard": "leaderboard",
    "compare": "compare",
    "CompareResult": "compare",
}

__all__ = ["RunFileError", "load_run", "validate_run", *_LAZY]


def __getattr__(name: str) -> Any:
    """Import the public functions of the submodules on first use."""
    if name in _LAZY:
        module = importlib.import_module(f"{__name__}.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------- loading


class RunFileError(ValueError):
    """A run JSON that cannot be used; the message is one line naming the file and the fix."""


def load_run(path: str | Path) -> dict:
    """Read and validate one run JSON, raising :class:`RunFileError` with a one-line message."""
    p = Path(path)
    if not p.is_file():
        raise RunFileError(f"{p}: no such file; {_RUN_HINT}")
    try:
        run = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise RunFileError(f"{p}: not valid JSON ({exc.msg}, line {exc.lineno}); {_RUN_HINT}") from None
    except UnicodeDecodeError:
        raise RunFileError(f"{p}: not a UTF-8 text file; {_RUN_HINT}") from None
    except OSError as exc:
        raise RunFileError(f"{p}: cannot read ({exc.strerror})") from None
    validate_run(run, source=str(p))
    return run


def validate_run(run: Any, source: str = "run") -> None:
    """Check the parts of the schema the reports rely on; raise :class:`RunFileError` if absent."""
    if not isinstance(run, dict):
        raise RunFileError(f"{source}: expected a JSON object, got {type(run).__name__}; {_RUN_HINT}")
    version = run.get("schema_version")
    if version != SCHEMA_VERSION:
        raise RunFileError(
            f"{source}: schema_version {version!r} is not supported (expected {SCHEMA_VERSION}); "
            f"re-run the benchmark with this harness version or {_RUN_HINT}"
        )
    records = run.get("records")
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise RunFileError(f"{source}: 'records' must be a list of objects; {_RUN_HINT}")


# --------------------------------------------------------------------------- record access


def as_number(value: Any) -> float | None:
    """A metric value as float (bools count as 0/1); None for null, NaN, text and series."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and not math.isnan(value):
        return float(value)
    return None


def mean(values: Iterable[Any]) -> float | None:
    """Mean of the numeric values, ignoring everything else; None when there are none."""
    nums = [n for n in map(as_number, values) if n is not None]
    return sum(nums) / len(nums) if nums else None


def metric(record: dict, name: str) -> Any:
    """One metric of a record (None when absent)."""
    return (record.get("metrics") or {}).get(name)


def timings(record: dict) -> dict:
    """The phase timings of a record ({} when absent)."""
    t = record.get("timings")
    return t if isinstance(t, dict) else {}


def editor_of(record: dict) -> str:
    return str(record.get("editor") or "?")


def suite_of(record: dict) -> str:
    return str(record.get("suite") or "?")


def is_skipped(record: dict) -> bool:
    return record.get("outcome") == "skipped"


def model_name(run: dict) -> str:
    model = run.get("model")
    return str((model or {}).get("name") or "unknown") if isinstance(model, dict) else "unknown"


def editors_of(run: dict) -> list[str]:
    """Editors in configured order, then any others in the order their records appear."""
    configured = ((run.get("config") or {}).get("editors")) or []
    names = [str(e) for e in configured if e is not None]
    for rec in run.get("records") or []:
        name = editor_of(rec)
        if name not in names:
            names.append(name)
    return names


def ordered_phases(names: Iterable[str]) -> list[str]:
    """Timing phase names: the usual ones first, the rest alphabetically."""
    usual = ("edit", "evaluate", "perplexity", "restore")
    names = set(names)
    return [p for p in usual if p in names] + sorted(names - set(usual))


# --------------------------------------------------------------------------- templates


def fmt(value: Any, digits: int = 4) -> str:
    """Human formatting for table cells: numbers to ``digits`` significant digits, None as a dash."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"{value:.{digits}g}"
    if isinstance(value, (list, tuple)):
        return f"[{len(value)} values]"
    return str(value)


def template_env() -> Environment:
    """Jinja2 environment for the report templates, with autoescaping always on."""
    env = Environment(
        loader=FileSystemLoader(str(TEMPLATES_DIR)),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["fmt"] = fmt
    return env
