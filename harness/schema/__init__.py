"""The run JSON's schema: one ``SCHEMA_VERSION`` and the JSON Schema file (``run.schema.json``) every loader
validates against. Version 1 runs (no provenance, summary keyed by name) still validate and load."""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 2
SUPPORTED_VERSIONS = (1, 2)
SCHEMA_PATH = Path(__file__).with_name("run.schema.json")


@functools.lru_cache(maxsize=1)
def run_schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


def schema_errors(run: Any) -> list[str]:
    """Every way ``run`` breaks the schema, as ``at <json path>: <message>``, most relevant first ([] if valid)."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(run_schema())
    errors = sorted(validator.iter_errors(run), key=jsonschema.exceptions.relevance)
    return [f"at {e.json_path}: {_short(e.message)}" for e in errors]


def _short(message: str, limit: int = 160) -> str:
    message = " ".join(message.split())
    return message if len(message) <= limit else message[:limit - 3] + "..."
