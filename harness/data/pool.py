"""Training pools: edits that are never evaluated, from which in-context editors draw their demonstrations (IKE)
and memory editors their unrelated inputs (WISE).

A pool is ``builtin`` (``builtin/ike_pool.json``, written for this project, no subject shared with the built-in
evaluation sets) or a file in one of two formats, told apart by their fields:

    EasyEdit CounterFact train   {"prompt", "subject", "target_new", "ground_truth", "rephrase_prompt",
                                  "locality_prompt", "locality_ground_truth"}   (the prompt holds the subject)
    MEND zsRE train              {"src", "subject", "alt", "answers", "rephrase", "loc", "loc_ans"}
                                 (zsRE's "loc" is an NQ question, "nq question: ...")
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

BUILTIN_POOL = Path(__file__).parent / "builtin" / "ike_pool.json"


class PoolError(ValueError):
    pass


@dataclass(frozen=True)
class PoolRecord:
    """One training edit: ``prompt`` (subject filled in) -> ``target_new``, a paraphrase of it, and an unrelated
    prompt with its answer."""

    subject: str
    prompt: str
    target_new: str
    paraphrase: str
    locality_prompt: str
    locality_answer: str


def _record(rec: dict, where: str) -> PoolRecord:
    try:
        if "src" in rec:                                                    # MEND zsRE
            return PoolRecord(rec["subject"], rec["src"], rec["alt"], rec["rephrase"], rec["loc"], rec["loc_ans"])
        return PoolRecord(rec["subject"], rec["prompt"], rec["target_new"], rec["rephrase_prompt"],
                          rec["locality_prompt"], rec["locality_ground_truth"])
    except KeyError as e:
        raise PoolError(f"{where}: missing field {e.args[0]!r}; a pool is EasyEdit CounterFact train JSON "
                        f"(prompt, subject, target_new, rephrase_prompt, locality_prompt, locality_ground_truth) "
                        f"or MEND zsRE train JSON (src, subject, alt, rephrase, loc, loc_ans)") from None


def load_pool(spec: str = "builtin", limit: int | None = None) -> list[PoolRecord]:
    """The pool ``spec`` names: ``builtin`` or a JSON file (first ``limit`` records when given)."""
    path = BUILTIN_POOL if spec in ("", "builtin") else Path(spec)
    if not path.exists():
        raise PoolError(f"pool {spec!r}: no such file; use 'builtin' or a CounterFact/zsRE train JSON, e.g. "
                        f"DATA_DIR/counterfact/counterfact_easyedit_train.json")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PoolError(f"pool {path}: not valid JSON ({e})") from None
    if not isinstance(data, list) or not data:
        raise PoolError(f"pool {path}: expected a non-empty JSON list of records")
    data = data[:limit] if limit else data
    return [_record(rec, f"pool {path}, record {i}") for i, rec in enumerate(data)]


def default_train_pool(data_dir: str | Path | None = None) -> str:
    """``--train-pool auto``: CounterFact's EasyEdit train split when the data dir holds it, else ``builtin``."""
    path = Path(data_dir) / "counterfact" / "counterfact_easyedit_train.json" if data_dir else None
    return str(path) if path is not None and path.exists() else "builtin"
