"""KnowEdit (Zhang et al., 2024, "A Comprehensive Study of Knowledge Editing for Large Language Models"), all four
subsets EasyEdit runs with ``run_knowedit_llama2.py``, read as EasyEdit's ``KnowEditDataset`` reads them.

=============  =================================================================================================
subset         record
=============  =================================================================================================
``zsre``       subject, prompt, target_new, ground_truth (list), rephrase_prompt, portability, locality
``counterfact`` subject, prompt, target_new, ground_truth (str), portability, locality (Relation_Specificity,
               Forgetfulness)
``recent``     (WikiData_recent) subject, prompt, target_new, portability, locality; **no ground_truth**
``wikibio``    text, labels, concept, locality (Relation_Specificity)
=============  =================================================================================================

How each field becomes part of an :class:`EditCase`, following EasyEdit:

* ``subject``/``concept``, ``prompt``/``text`` and ``target_new``/``labels`` are the edit (EasyEdit's
  ``KnowEditDataset`` falls back from the first name to the second exactly so). WikiBio's edit prompt is the whole
  passage and its target the next sentence. The subject must occur in the prompt (the locate-then-edit editors need
  its last token); a case-insensitive match is accepted and the prompt's own spelling becomes the subject.
* ``ground_truth``: EasyEdit sets it to None when a record has none (WikiData_recent, WikiBio), and its editors only
  use it for display. Here ``target_true`` is None too, so the CounterFact probability comparisons (which need the
  old answer) are not computed for those subsets; teacher-forced and WILD efficacy, portability and locality are.
* ``portability`` and ``locality``: name -> list of ``{"prompt", "ground_truth"}``. Answers may be nested alias
  lists (``[["Kai Wegner", "Kai Peter Wegner"]]``); EasyEdit scores the first alias (``while isinstance(an, list):
  an = an[0]``) and skips items whose answer is empty; so does this loader, keeping all aliases too. Groups are kept
  by name in ``extra["portability"]`` and ``extra["locality_groups"]`` (``{name: [{"prompt", "answers"}]}``); all
  locality items also go to ``case.locality`` as (prompt, first alias) pairs, which the locality suite scores.

``locality`` is required (EasyEdit's loader indexes it unconditionally); ``portability`` is optional. Every field is
checked when the file is loaded: a malformed record raises a one-line :class:`DataError` naming the file, the record
and the field (or is skipped with ``skip_invalid``), never in the middle of a test.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .case import EditCase
from .loaders import (PREFIX_LOADERS, DataError, Record, _Invalid, _case_id, _escape, _parse_all, _template,
                      _text, _texts, read_json_records)

SUBSETS = ("zsre", "counterfact", "recent", "wikibio")
PORTABILITY_GROUPS = ("Reasoning", "Subject_Aliasing", "Logical_Generalization")
LOCALITY_GROUPS = ("Relation_Specificity", "Forgetfulness")
_KEYS = {"case_id", "id", "subject", "concept", "prompt", "text", "target_new", "labels", "ground_truth",
         "rephrase_prompt", "portability", "locality"}


def sniff_subset(record: Any) -> str:
    """The KnowEdit subset a record belongs to, from its keys (the module docstring's table)."""
    if not isinstance(record, dict):
        raise DataError(f"KnowEdit records are JSON objects, got a {type(record).__name__}")
    if {"text", "labels", "concept"} <= set(record):
        return "wikibio"
    if "prompt" not in record or "target_new" not in record:
        keys = ", ".join(sorted(map(str, record))[:12])
        raise DataError(f"not a KnowEdit record (keys: {keys}); expected subject/prompt/target_new "
                        "or WikiBio's text/labels/concept")
    if "ground_truth" not in record:
        return "recent"
    return "zsre" if "rephrase_prompt" in record else "counterfact"


def answer_aliases(value: Any, field: str) -> list[str]:
    """All answer strings in a possibly nested list, in order (the first is the one EasyEdit scores)."""
    if isinstance(value, str):
        return [value.strip()] if value.strip() else []
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [str(value)]
    if isinstance(value, list):
        return [a for v in value for a in answer_aliases(v, field)]
    raise _Invalid(field, f"should be a string or a (nested) list of strings, got {type(value).__name__}")


def _group_items(items: Any, field: str) -> list[dict[str, Any]]:
    if isinstance(items, dict):
        items = [items]
    if not isinstance(items, list):
        raise _Invalid(field, "should be a list of {'prompt', 'ground_truth'} objects")
    out = []
    for j, item in enumerate(items):
        where = f"{field}[{j}]"
        if not isinstance(item, dict) or "prompt" not in item or "ground_truth" not in item:
            raise _Invalid(where, "should be an object with 'prompt' and 'ground_truth'")
        prompts = item["prompt"] if isinstance(item["prompt"], list) else [item["prompt"]]
        if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise _Invalid(f"{where}.prompt", "should be a non-empty string")
        answers = answer_aliases(item["ground_truth"], f"{where}.ground_truth")
        if answers:                                         # EasyEdit skips items with an empty answer
            out.extend({"prompt": p, "answers": answers} for p in prompts)
    return out


def _groups(rec: Record, key: str, *, required: bool) -> dict[str, list[dict[str, Any]]]:
    value = rec.get(key)
    if value is None:
        if required:
            raise _Invalid(key, "is missing (KnowEdit records carry a 'locality' object, possibly empty)")
        return {}
    if not isinstance(value, dict):
        raise _Invalid(key, "should map group names (e.g. Relation_Specificity) to lists of "
                            "{'prompt', 'ground_truth'} objects")
    return {str(name): _group_items(items, f"{key}.{name}") for name, items in value.items()}


def _subject_template(prompt: str, subject: str, prompt_field: str, subject_field: str) -> tuple[str, str]:
    """(template, subject as written in the prompt): exact match first, then case-insensitive."""
    if subject in prompt:
        return _template(prompt, subject, prompt_field, subject_field), subject
    i = prompt.lower().find(subject.lower())
    if i < 0:
        raise _Invalid(subject_field, f"({subject!r}) does not occur in field '{prompt_field}' ({prompt[:80]!r})")
    as_written = prompt[i:i + len(subject)]
    return _escape(prompt[:i]) + "{}" + _escape(prompt[i + len(subject):]), as_written


def _parse(subset: str):
    wikibio = subset == "wikibio"
    f_subject, f_prompt, f_target = ("concept", "text", "labels") if wikibio else ("subject", "prompt", "target_new")

    def parse(rec: Record, index: int) -> EditCase:
        subject, prompt = _text(rec, f_subject, strip=True), _text(rec, f_prompt)
        assert subject is not None and prompt is not None
        template, subject = _subject_template(prompt, subject, f_prompt, f_subject)
        targets = answer_aliases(rec.get(f_target), f_target) if f_target in rec else []
        if not targets:
            raise _Invalid(f_target, "is missing or empty")
        truth = answer_aliases(rec["ground_truth"], "ground_truth") if rec.get("ground_truth") is not None else []
        locality = _groups(rec, "locality", required=True)
        portability = _groups(rec, "portability", required=False)
        extra: dict[str, Any] = {k: v for k, v in rec.items() if k not in _KEYS}
        extra.update(knowedit_subset=subset, portability=portability, locality_groups=locality)
        if len(truth) > 1:
            extra["ground_truth_aliases"] = truth
        return EditCase(
            case_id=_case_id(rec, index),
            subject=subject,
            prompt=template,
            target_new=targets[0],
            target_true=truth[0] if truth else None,
            paraphrase_prompts=_texts(rec, "rephrase_prompt"),
            locality=tuple((item["prompt"], item["answers"][0]) for items in locality.values() for item in items),
            source=f"knowedit-{subset}",
            extra=extra,
        )
    return parse


def load_knowedit(path: str | os.PathLike[str], *, subset: str = "auto", limit: int | None = None,
                  skip_invalid: bool = False) -> list[EditCase]:
    """Load a KnowEdit file (``subset`` one of zsre / counterfact / recent / wikibio, or ``auto``: sniffed from
    the first record). Every record is validated now; see the module docstring for the mapping."""
    p = Path(path)
    records = read_json_records(p)
    if not records:
        raise DataError(f"{p.name}: contains no records")
    if subset == "auto":
        try:
            subset = sniff_subset(records[0])
        except DataError as e:
            raise DataError(f"{p.name} record 0: {e}") from None
    if subset not in SUBSETS:
        raise DataError(f"KnowEdit subset {subset!r}: use one of {', '.join(SUBSETS)} or auto")
    return _parse_all(records, _parse(subset), name=p.name, limit=limit, skip_invalid=skip_invalid)


def portability_items(case: EditCase) -> dict[str, list[tuple[str, list[str]]]]:
    """``{group: [(prompt, aliases)]}`` of a KnowEdit case (empty for other cases)."""
    groups = case.extra.get("portability") or {}
    return {g: [(i["prompt"], list(i["answers"])) for i in items] for g, items in groups.items() if items}


def locality_items(case: EditCase) -> dict[str, list[tuple[str, str]]]:
    """``{group: [(prompt, first alias)]}``: KnowEdit's named locality groups, else the case's plain pairs."""
    groups = case.extra.get("locality_groups")
    if groups:
        return {g: [(i["prompt"], i["answers"][0]) for i in items] for g, items in groups.items() if items}
    return {"locality": list(case.locality)} if case.locality else {}


PREFIX_LOADERS["knowedit"] = load_knowedit        # --dataset knowedit:FILE
