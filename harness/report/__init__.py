"""Reports built from the run JSON written by the harness pytest plugin.

Public API (imported lazily, so that e.g. ``harness compare`` does not load matplotlib):

* :func:`render_html`, :func:`write_html` (``harness.report.html``): one self-contained HTML page per run.
* :func:`load_runs`, :func:`leaderboard`, :func:`write_leaderboard` (``harness.report.leaderboard``).
* :func:`compare`, :class:`CompareResult` (``harness.report.compare``): regressions against a baseline run.

* :func:`export_table` (``harness.report.export``): per (suite, editor) tables as markdown, LaTeX or CSV.

This module also holds the small helpers they share for reading run dicts (schema versions 1 and 2). Every
aggregate they show comes from :func:`harness.metrics.registry.summarize` (one aggregation, with intervals), and
every metric's label, unit and direction from the metric registry.
"""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined

from harness.editor_aliases import canonical_editor
from harness.metrics.registry import (
    Aggregate,
    GroupSummary,
    MetricSpec,
    metric_spec,
    summarize,
    to_number,
)
from harness.schema import SCHEMA_VERSION, SUPPORTED_VERSIONS, schema_errors

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
    "export_table": "export",
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
    """Check the run against ``harness/schema/run.schema.json`` (versions 1 and 2); raise :class:`RunFileError`
    with the first problem on one line."""
    if not isinstance(run, dict):
        raise RunFileError(f"{source}: expected a JSON object, got {type(run).__name__}; {_RUN_HINT}")
    version = run.get("schema_version")
    if version not in SUPPORTED_VERSIONS:
        raise RunFileError(
            f"{source}: schema_version {version!r} is not supported (this harness reads "
            f"{', '.join(map(str, SUPPORTED_VERSIONS))}); re-run the benchmark with this harness version or {_RUN_HINT}"
        )
    records = run.get("records")
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise RunFileError(f"{source}: 'records' must be a list of objects; {_RUN_HINT}")
    errors = schema_errors(run)
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise RunFileError(f"{source}: does not match the run schema {SCHEMA_VERSION}: {errors[0]}{more}; "
                           f"{_RUN_HINT}")


# --------------------------------------------------------------------------- record access


def as_number(value: Any) -> float | None:
    """A metric value as float (bools count as 0/1, "inf" as infinity); None for null, NaN, text and series."""
    return to_number(value)


def metric(record: dict, name: str) -> Any:
    """One metric of a record (None when absent)."""
    return (record.get("metrics") or {}).get(name)


def timings(record: dict) -> dict:
    """The phase timings of a record ({} when absent)."""
    t = record.get("timings")
    return t if isinstance(t, dict) else {}


def editor_of(record: dict) -> str:
    """The record's editor under its canonical name (an alias such as ``ft`` of an older run reads as ``ft_l``)."""
    return str(canonical_editor(record.get("editor")) or "?")


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
    names = list(dict.fromkeys(str(canonical_editor(e)) for e in configured if e is not None))
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


def run_groups(run: dict) -> list[GroupSummary]:
    """The run's per (suite, editor) aggregates, recomputed from its records (so schema 1 runs, whose summary
    had no intervals, read the same as new ones)."""
    return summarize(r for r in run.get("records") or [] if isinstance(r, dict))


def thresholds_of(run: dict) -> dict:
    config = run.get("config") if isinstance(run.get("config"), dict) else {}
    return config.get("thresholds") if isinstance(config.get("thresholds"), dict) else {}


def collapse_threshold(run: dict) -> float:
    """The run's collapse threshold (perplexity ratio), 2.0 when the run does not say."""
    value = to_number(thresholds_of(run).get("collapse_ppl_ratio"))
    return value if value is not None else 2.0


def dataset_of(run: dict) -> dict:
    """What the run's cases came from: provenance.dataset (schema 2), else config.dataset (schema 1)."""
    prov = run.get("provenance") if isinstance(run.get("provenance"), dict) else {}
    dataset = prov.get("dataset") if isinstance(prov.get("dataset"), dict) else None
    if dataset:
        return dataset
    config = run.get("config") if isinstance(run.get("config"), dict) else {}
    return {"spec": config.get("dataset"), "kind": None, "sha256": None}


def dataset_key(run: dict) -> tuple[str, str]:
    """Two runs used the same dataset when these agree: the resolved spec and the file's sha256 (schema 1: the
    spec as given, with no digest)."""
    d = dataset_of(run)
    return (str(d.get("spec") or "?"), str(d.get("sha256") or "-"))


def dataset_label(run: dict) -> str:
    spec, digest = dataset_key(run)
    return spec if digest == "-" else f"{spec} (sha256 {digest[:12]})"


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


def fmt_aggregate(agg: Aggregate | None, spec: MetricSpec | None = None, digits: int = 3) -> str:
    """``0.95 [0.90, 1.00]`` (value and 95% interval); a minimum without interval as its value (+inf: never)."""
    if agg is None or agg.value is None:
        return "-"
    if agg.aggregation == "min":
        return "never" if agg.value == math.inf else fmt(agg.value, digits + 1)
    if agg.low is None or agg.high is None or agg.n < 2:
        return fmt(agg.value, digits)
    return f"{fmt(agg.value, digits)} [{fmt(agg.low, digits)}, {fmt(agg.high, digits)}]"


def metric_label(name: str) -> str:
    return metric_spec(name).display


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
    env.filters["fmt_agg"] = fmt_aggregate
    return env
