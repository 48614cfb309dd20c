"""Local data for the downstream task YAMLs: each function is a ``custom_dataset`` of lm-eval, called with the task's
metadata, where the harness puts ``data_dir`` (``--data-dir``). Files are read from ``DATA_DIR/downstream/`` and
returned as a ``datasets.DatasetDict`` with one ``test`` split, built in memory (no hub, no dataset cache), with the
fields lm-eval's own task of the same name reads, so the YAMLs keep lm-eval's prompts.

Order: every file is used in its source order (lm-eval's ``limit`` takes a prefix), except BoolQ, whose balanced
subset lists all False then all True questions: it is interleaved False/True so that any prefix is balanced.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from ..data.loaders import DataError, resolve_data_dir

SUBDIR = "downstream"


def data_file(name: str, data_dir: str | None, task: str) -> Path:
    """``DATA_DIR/downstream/<name>``, or a one-line error naming the file and ``--data-dir``."""
    root = resolve_data_dir(data_dir)
    if root is None:
        raise DataError(f"downstream task {task} reads {SUBDIR}/{name} from the data dir; pass --data-dir "
                        "(or set HARNESS_DATA_DIR) to the folder that holds downstream/")
    path = root / SUBDIR / name
    if not path.is_file():
        raise DataError(f"downstream task {task}: {path} not found; pass --data-dir pointing to the folder that "
                        f"holds {SUBDIR}/{name}")
    return path


def _jsonl(path: Path) -> list[dict[str, Any]]:
    out = []
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}: line {i} is not valid JSON ({e.msg}); the file should be JSON "
                                    "lines") from None
    return out


def _json_list(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); expected a list of records") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def _field(rec: dict, key: str, path: Path, i: int) -> Any:
    if key not in rec:
        raise DataError(f"{path}: record {i} has no field '{key}'")
    return rec[key]


def _split(records: list[dict[str, Any]]):
    import datasets
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(records)})


# --- one function per task (names referenced by the YAMLs) --------------------------------------------------
def boolq(data_dir: str | None = None, **_: Any):
    path = data_file("boolq_dev_balanced2474.jsonl", data_dir, "boolq")
    recs = [{"question": _field(r, "question", path, i), "passage": _field(r, "passage", path, i),
             "label": int(bool(_field(r, "answer", path, i)))} for i, r in enumerate(_jsonl(path))]
    neg, pos = [r for r in recs if r["label"] == 0], [r for r in recs if r["label"] == 1]
    mixed = [r for pair in zip(neg, pos) for r in pair] + neg[len(pos):] + pos[len(neg):]
    return _split(mixed)


def piqa(data_dir: str | None = None, **_: Any):
    path = data_file("piqa_valid.jsonl", data_dir, "piqa")
    labels_path = data_file("piqa_valid-labels.lst", data_dir, "piqa")
    recs = _jsonl(path)
    labels = [line.strip() for line in labels_path.read_text().splitlines() if line.strip()]
    if len(labels) != len(recs):
        raise DataError(f"{labels_path}: {len(labels)} labels for {len(recs)} questions in {path.name}; the two "
                        "files must be line-aligned")
    return _split([{"goal": _field(r, "goal", path, i), "sol1": _field(r, "sol1", path, i),
                    "sol2": _field(r, "sol2", path, i), "label": int(lab)}
                   for i, (r, lab) in enumerate(zip(recs, labels))])


def arc_challenge(data_dir: str | None = None, **_: Any):
    """The ARC jsonl (``question.stem``, ``question.choices[{text,label}]``, ``answerKey``) in the Hugging Face
    ``allenai/ai2_arc`` schema that lm-eval's arc_challenge reads."""
    path = data_file("arc_challenge_test.jsonl", data_dir, "arc_challenge")
    out = []
    for i, r in enumerate(_jsonl(path)):
        q = _field(r, "question", path, i)
        choices = q.get("choices") if isinstance(q, dict) else None
        if not choices:
            raise DataError(f"{path}: record {i} has no question.choices")
        labels = [c["label"] for c in choices]
        key = _field(r, "answerKey", path, i)
        if key not in labels:
            raise DataError(f"{path}: record {i}: answerKey {key!r} is not one of the choice labels {labels}")
        out.append({"id": r.get("id", str(i)), "question": q["stem"],
                    "choices": {"text": [c["text"] for c in choices], "label": labels}, "answerKey": key})
    return _split(out)


def hellaswag(data_dir: str | None = None, **_: Any):
    path = data_file("hellaswag_val_sample1000.jsonl", data_dir, "hellaswag")
    keys = ("activity_label", "ctx_a", "ctx_b", "endings", "label")
    return _split([{k: _field(r, k, path, i) for k in keys} for i, r in enumerate(_jsonl(path))])


def mmlu_chemistry(data_dir: str | None = None, **_: Any):
    """MMLU's original CSV layout: question, A, B, C, D, answer letter (no header)."""
    path = data_file("mmlu_high_school_chemistry_test.csv", data_dir, "mmlu_chemistry")
    out = []
    with path.open(encoding="utf-8", newline="") as f:
        for i, row in enumerate(csv.reader(f)):
            if len(row) != 6 or row[5] not in "ABCD":
                raise DataError(f"{path}: row {i + 1} should be question, A, B, C, D, answer letter; got "
                                f"{len(row)} columns")
            out.append({"question": row[0], "choices": row[1:5], "answer": "ABCD".index(row[5])})
    return _split(out)


def mmlu(data_dir: str | None = None, **_: Any):
    """The 1,516-question, 57-subject MMLU subset of AlphaEdit / unified-model-editing (``glue_eval/mmlu.json``)."""
    path = data_file("glue_eval/mmlu.json", data_dir, "mmlu")
    return _split([{"question": _field(r, "question", path, i), "subject": r.get("subject", ""),
                    "choices": _field(r, "choices", path, i), "answer": int(_field(r, "answer", path, i))}
                   for i, r in enumerate(_json_list(path))])


def _glue(name: str, keys: tuple[str, ...], data_dir: str | None):
    path = data_file(f"glue_eval/{name}.json", data_dir, name)
    return _split([{**{k: _field(r, k, path, i) for k in keys}, "label": int(_field(r, "label", path, i))}
                   for i, r in enumerate(_json_list(path))])


def sst2(data_dir: str | None = None, **_: Any):
    return _glue("sst2", ("sentence",), data_dir)


def cola(data_dir: str | None = None, **_: Any):
    return _glue("cola", ("sentence",), data_dir)


def mrpc(data_dir: str | None = None, **_: Any):
    return _glue("mrpc", ("sentence1", "sentence2"), data_dir)


def rte(data_dir: str | None = None, **_: Any):
    return _glue("rte", ("sentence1", "sentence2"), data_dir)


def nq_open(data_dir: str | None = None, **_: Any):
    path = data_file("nq_open_dev.jsonl", data_dir, "nq_open")
    out = []
    for i, r in enumerate(_jsonl(path)):
        ans = _field(r, "answer", path, i)
        out.append({"question": _field(r, "question", path, i), "answer": ans if isinstance(ans, list) else [ans]})
    return _split(out)


def gsm8k(data_dir: str | None = None, **_: Any):
    path = data_file("gsm8k_test.jsonl", data_dir, "gsm8k")
    return _split([{"question": _field(r, "question", path, i), "answer": _field(r, "answer", path, i)}
                   for i, r in enumerate(_jsonl(path))])
