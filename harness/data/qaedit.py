"""QAEdit (Yang et al., ACL 2025, "The Mirage of Model Editing") and zsRE in the same question-answering form.

QAEdit records (``QAEdit.json`` / ``QAEdit_inter_1k.json`` of WanliYoung/Revisit-Editing-Evaluation)::

    {"id": 1104, "source": "NQ", "prompt": "who has the most 70 point games in nba history?",
     "target": "Wilt Chamberlain *", "subject": "most 70 point games in nba history",
     "rephrase": "Which NBA player holds the record ...?",
     "locality": [{"loc": "who is the saint that protects police officers", "loc_ans": "Michael"}, ...]}

Each becomes an :class:`EditCase` whose edit prompt is the question itself (WILD's "question-only" context), with
``target_new`` = ``target`` (the *correct* answer the model lacks: QAEdit edits in true facts, so there is no other
``target_true`` and the CounterFact probability comparisons do not apply), the rephrased question as paraphrase, and
every locality question as a (question, answer) pair in ``locality`` (WILD's ``edit.py`` uses only the first of the
five; all are kept, the first is ``extra["locality_first"]``). A trailing footnote marker (``" *"``, one record of
the 1k sample) is removed from the target and the raw target kept in ``extra["raw_target"]``.

zsRE in QA form (:func:`load_zsre_qa`): MEND's records read as WILD's ``edit.py --datatype zsre`` does: the question
``src`` as prompt, ``alt`` as target, ``rephrase`` as paraphrase, (``loc``, ``loc_ans``) as the locality pair (its
``"nq question: "`` prefix kept, as in WILD), and every gold answer in ``extra["answers"]``.
"""
from __future__ import annotations

import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from .case import EditCase
from .loaders import (SET_LOADERS, DataError, Record, _Invalid, _case_id, _get, _parse_all, _parse_zsre,
                      _template, _text, read_json_records)

_QAEDIT_KEYS = {"id", "source", "prompt", "target", "subject", "rephrase", "locality"}
_FOOTNOTE = re.compile(r"(^|\s+)\*$")      # a trailing footnote marker: "Wilt Chamberlain *"


def _locality_pairs(rec: Record) -> tuple[tuple[str, str], ...]:
    value = _get(rec, "locality")
    if not isinstance(value, list) or not value:
        raise _Invalid("locality", "should be a non-empty list of {'loc', 'loc_ans'} objects")
    pairs = []
    for j, item in enumerate(value):
        if not isinstance(item, dict):
            raise _Invalid(f"locality[{j}]", "should be an object with 'loc' and 'loc_ans'")
        loc = _text(item, "loc")
        ans = _text(item, "loc_ans", strip=True)
        pairs.append((loc, ans))
    return tuple(pairs)  # type: ignore[return-value]


def _parse_qaedit(rec: Record, index: int) -> EditCase:
    question = _text(rec, "prompt")
    subject = _text(rec, "subject")
    raw_target = _text(rec, "target", strip=True)
    assert question is not None and subject is not None and raw_target is not None
    target = _FOOTNOTE.sub("", raw_target).strip()
    if not target:
        raise _Invalid("target", "is only a footnote marker")
    locality = _locality_pairs(rec)
    extra: dict[str, Any] = {k: v for k, v in rec.items() if k not in _QAEDIT_KEYS}
    if rec.get("source") is not None:
        extra["qa_source"] = rec["source"]        # NQ / TQA / SQA: where the question comes from
    extra["locality_first"] = list(locality[0])
    if target != raw_target:
        extra["raw_target"] = raw_target
    return EditCase(
        case_id=_case_id(rec, index),
        subject=subject,
        prompt=_template(question, subject, "prompt"),
        target_new=target,
        target_true=None,
        paraphrase_prompts=(_text(rec, "rephrase"),),  # type: ignore[arg-type]
        locality=locality,
        source="qaedit",
        extra=extra,
    )


def load_qaedit(path: str | os.PathLike[str], *, limit: int | None = None, skip_invalid: bool = False
                ) -> list[EditCase]:
    """Load QAEdit records; a record without prompt, subject (inside the prompt), target, rephrase or a locality
    list raises a one-line :class:`DataError` naming the record and field."""
    p = Path(path)
    records = read_json_records(p)
    if records and isinstance(records[0], dict) and "target" not in records[0] and "src" in records[0]:
        raise DataError(f"{p.name}: these are zsRE records (src/alt), not QAEdit (prompt/target); "
                        "use --dataset zsre or load_zsre_qa")
    return _parse_all(records, _parse_qaedit, name=p.name, limit=limit, skip_invalid=skip_invalid)


def _parse_zsre_qa(rec: Record, index: int) -> EditCase:
    case = _parse_zsre("zsre-qa")(rec, index)
    answers = rec.get("answers")
    answers = [answers] if isinstance(answers, str) else answers or []
    extra = {**case.extra, "answers": [a.strip() for a in answers if isinstance(a, str) and a.strip()]}
    if case.locality:
        extra["locality_first"] = list(case.locality[0])
    return replace(case, extra=extra)


def load_zsre_qa(path: str | os.PathLike[str], *, limit: int | None = None, skip_invalid: bool = False
                 ) -> list[EditCase]:
    """MEND zsRE records in QAEdit's form (module docstring): the cases ``load_zsre`` gives, with
    ``source="zsre-qa"`` and the gold answers in ``extra["answers"]``."""
    p = Path(path)
    return _parse_all(read_json_records(p), _parse_zsre_qa, name=p.name, limit=limit, skip_invalid=skip_invalid)


SET_LOADERS.update({"qaedit": load_qaedit, "zsre-qa": load_zsre_qa})   # --dataset qaedit / zsre-qa
