"""Loaders that turn every supported edit-data format into :class:`EditCase` lists.

Formats: ROME CounterFact JSON, EasyEdit / KnowEdit / HardEdit records, MEND zsRE records, plus the built-in
sets shipped in ``builtin/`` (CounterFact format) and, optionally, Hugging Face datasets (``hf:owner/name``).
Every malformed record raises a one-line :class:`DataError` naming the file, the record and the field, unless
``skip_invalid`` is set: then it is skipped, one :class:`SkippedRecordsWarning` per file gives the count, and the
returned :class:`LoadedCases` lists every skipped record (``.skipped``) for the run to report. A file whose records
are all invalid is an error either way.

Case ids are unique within a load: results are kept by case id (a stream of 3 edits with two ids alike was scored as
2), so a record repeating an earlier record's id is invalid like a malformed one (refused in one line naming the
file, the record and the id; left out with ``skip_invalid``). The one legitimate repetition is a file that numbers
its records per ``source`` (QAEdit counts NQ, TQA and SQA questions separately): its cases are named SOURCE-ID
(``NQ-1104``), see ``_ids_by_source``.

A file given by path is sniffed from its first record (:func:`sniff_format`): ROME CounterFact, MEND zsRE, EasyEdit,
KnowEdit (read as ``knowedit:FILE``) and QAEdit (read as ``qaedit``) records.
"""
from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from .case import EditCase

BUILTIN_DIR = Path(__file__).resolve().parent / "builtin"
DATA_DIR_ENV = "HARNESS_DATA_DIR"
SKIP_HINT = "fix the record or pass --skip-invalid"

# named sets: spec -> path relative to the data dir (None: built-in file)
NAMED_SETS: dict[str, str] = {
    "counterfact": "counterfact/counterfact_rome_sample500.json",
    "counterfact-easyedit": "counterfact/counterfact_easyedit_edit.json",
    "zsre": "zsre/zsre_mend_train_1k.json",
    "zsre-qa": "zsre/zsre_mend_train_1k.json",
    "qaedit": "collapse/QAEdit_inter_1k.json",
}
# Loaders that live in other modules of this package register here when the package is imported (qaedit.py,
# knowedit.py): a named set's file loader, by set name, and ``PREFIX:FILE`` loaders (``knowedit:FILE``), by prefix.
FileLoader = Callable[..., "list[EditCase]"]
SET_LOADERS: dict[str, FileLoader] = {}
PREFIX_LOADERS: dict[str, FileLoader] = {}
BUILTIN_SETS: dict[str, str] = {"builtin": "edits.json", "builtin-hard": "hard_edits.json"}


class DataError(ValueError):
    """A data file or record cannot be used; the message is one line naming file, record, field and the fix."""


class _Invalid(Exception):
    """Raised inside a record parser; the loop turns it into a DataError with file/record context."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"field '{field}' {problem}")
        self.field = field
        self.problem = problem


class SkippedRecordsWarning(UserWarning):
    """--skip-invalid left records of a file out (the message gives the file, the count and the first reason)."""


@dataclass(frozen=True)
class SkippedRecord:
    """One record ``--skip-invalid`` left out: where it is and why."""

    file: str            # the file's name (or the hf: spec)
    index: int           # position in the file's list of records (0-based)
    record_id: str | None  # "case_id 3648", "id 7", ... when the record has one
    field: str           # the offending field ("<record>" when the record is not an object)
    reason: str          # the one-line message a strict load would have raised

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class LoadedCases(list):
    """The cases of one load (a plain ``list`` of :class:`EditCase`), with the records ``skip_invalid`` left out."""

    def __init__(self, cases: Iterable[EditCase] = (), skipped: Iterable[SkippedRecord] = ()):
        super().__init__(cases)
        self.skipped: list[SkippedRecord] = list(skipped)

    def skip_summary(self) -> str | None:
        """One line for the terminal / run JSON (None when nothing was skipped)."""
        if not self.skipped:
            return None
        files = sorted({s.file for s in self.skipped})
        return (f"--skip-invalid left out {len(self.skipped)} invalid record(s) of {', '.join(files)} "
                f"(first: {self.skipped[0].reason})")


Record = dict[str, Any]
Parser = Callable[[Record, int], EditCase]


# --------------------------------------------------------------------------------------------------- helpers

def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """The data dir: the argument, else ``$HARNESS_DATA_DIR``, else None (no check that it exists)."""
    value = data_dir if data_dir not in (None, "") else os.environ.get(DATA_DIR_ENV) or None
    return Path(value).expanduser() if value is not None else None


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def read_json_records(path: str | os.PathLike[str]) -> list[Any]:
    """Read a JSON list (or a JSON-lines file) of records; DataError naming the file otherwise."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: file not found")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{p}: cannot read file ({_one_line(e)})") from e
    try:
        if p.suffix == ".jsonl":
            data: Any = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{p.name}: not valid JSON ({e.msg} at line {e.lineno}); pass a JSON list of records") from e
    if not isinstance(data, list):
        raise DataError(f"{p.name}: expected a JSON list of records, got a JSON {type(data).__name__}")
    return data


def _get(rec: Record, dotted: str, *, required: bool = True) -> Any:
    """Value at a dotted key path; _Invalid when a required key is missing."""
    cur: Any = rec
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur or cur[part] is None:
            if required:
                raise _Invalid(dotted, "is missing")
            return None
        cur = cur[part]
    return cur


def _preview(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _text(rec: Record, dotted: str, *, required: bool = True, strip: bool = False) -> str | None:
    """A non-empty string field (optionally stripped). Any other type, a list included, is an error: taking a
    list's first element would silently edit something else than the record says."""
    value = _get(rec, dotted, required=required)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _Invalid(dotted, f"should be a string, got {type(value).__name__} {_preview(value)}")
    if strip:
        value = value.strip()
    if not value.strip():
        if required:
            raise _Invalid(dotted, "is empty")
        return None
    return value


def _texts(rec: Record, dotted: str) -> tuple[str, ...]:
    """An optional string-or-list-of-strings field as a tuple (empty strings dropped)."""
    value = _get(rec, dotted, required=False)
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
        raise _Invalid(dotted, "should be a string or a list of strings")
    return tuple(x for x in items if x.strip())


def _first_text(value: Any, dotted: str) -> str | None:
    """First answer in a possibly nested list of alternatives (KnowEdit ground truths are sometimes [[...]]): a
    string, or a number written as one; an object or a boolean is an error naming ``dotted``."""
    while isinstance(value, list):
        if not value:
            return None
        value = value[0]
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise _Invalid(dotted, f"should be a string or a list of strings, got {type(value).__name__} "
                               f"{_preview(value)}")
    return str(value).strip() or None


def _escape(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


def _template(prompt: str, subject: str, prompt_field: str, subject_field: str = "subject") -> str:
    """``prompt`` with the first occurrence of ``subject`` replaced by ``{}`` (literal braces escaped)."""
    i = prompt.find(subject)
    if i < 0:
        raise _Invalid(subject_field, f"({subject!r}) does not occur in field '{prompt_field}' ({prompt!r})")
    return _escape(prompt[:i]) + "{}" + _escape(prompt[i + len(subject):])


def _fills_to(template: str, subject: str, prompt: str) -> bool:
    """Whether ``template`` is a valid one-placeholder template giving ``prompt`` for ``subject``."""
    try:
        return "{}" in template and template.format(subject) == prompt
    except (IndexError, KeyError, ValueError):
        return False


def _check_template(template: str, dotted: str) -> None:
    if "{}" not in template:
        raise _Invalid(dotted, f"has no '{{}}' placeholder for the subject ({template!r})")
    try:
        template.format("x")
    except (IndexError, KeyError, ValueError) as e:
        raise _Invalid(dotted, f"is not a valid template ({_one_line(e)})") from e


def _record_id(rec: Any) -> str | None:
    if isinstance(rec, dict):
        for key in ("case_id", "id", "case_index", "known_id"):
            if rec.get(key) is not None:
                return f"{key} {rec[key]}"
    return None


def _case_id(rec: Record, index: int) -> str:
    for key in ("case_id", "id", "case_index"):
        if rec.get(key) is not None:
            return str(rec[key])
    return str(index)


def _id_field(rec: Record) -> str:
    """The field a record's case id comes from (``_case_id``): case_id, id or case_index; '<index>' when none."""
    return next((k for k in ("case_id", "id", "case_index") if rec.get(k) is not None), "<index>")


def _ids_by_source(records: Sequence[Any]) -> bool:
    """Whether the file numbers its records per ``source``: an id repeats on records that name different
    ``source`` strings (QAEdit counts NQ, TQA and SQA questions separately; its 1k sample has 37 ids twice). Then
    every case of the file whose record has a ``source`` is named SOURCE-ID (``TQA-918``), whatever ``limit`` is, so
    that ids are unique and stable; an id still repeated after that is a duplicate record (refused, or skipped
    with ``skip_invalid``)."""
    sources: dict[str, list[Any]] = {}
    for i, rec in enumerate(records):
        if isinstance(rec, dict):
            sources.setdefault(_case_id(rec, i), []).append(rec.get("source"))
    return any(len(s) > 1 and all(isinstance(x, str) and x for x in s) and len(set(s)) > 1
               for s in sources.values())


def _parse_all(records: Sequence[Any], parse: Parser, *, name: str, limit: int | None,
               skip_invalid: bool) -> LoadedCases:
    """Parse records in order, stopping after ``limit`` valid cases; raise on a bad record, or skip it (and list
    it in ``.skipped``, with one warning for the file). All records invalid, or none at all, is an error."""
    if limit is not None and limit < 0:
        raise DataError(f"limit must be >= 0, got {limit}")
    if not records:
        raise DataError(f"{name}: contains no records")
    by_source = _ids_by_source(records)
    cases = LoadedCases()
    seen: dict[str, int] = {}                    # case id -> the record that has it
    for i, rec in enumerate(records):
        if limit is not None and len(cases) >= limit:
            break
        rid = _record_id(rec)
        where = f"{name} record {i}" + (f" ({rid})" if rid else "")
        try:
            if not isinstance(rec, dict):
                raise _Invalid("<record>", f"should be a JSON object, got {type(rec).__name__}")
            case = parse(rec, i)
            if by_source and isinstance(rec.get("source"), str):
                case = replace(case, case_id=f"{rec['source']}-{case.case_id}")
            if case.case_id in seen:
                raise _Invalid(_id_field(rec), f"repeats the case id {case.case_id!r} of record {seen[case.case_id]}: "
                                               "case ids must be unique in a data set (results are kept by case id)")
            seen[case.case_id] = i
            cases.append(case)
        except _Invalid as e:
            msg = _one_line(f"{where}: {e}")
            if not skip_invalid:
                raise DataError(f"{msg}; {SKIP_HINT}") from None
            cases.skipped.append(SkippedRecord(name, i, rid, e.field, msg))
    if cases.skipped and not cases:
        raise DataError(f"{name}: all {len(cases.skipped)} record(s) read are invalid (first: "
                        f"{cases.skipped[0].reason}); fix the file or give another --dataset")
    if cases.skipped:
        warnings.warn(f"{name}: skipped {len(cases.skipped)} invalid record(s) (--skip-invalid); first: "
                      f"{cases.skipped[0].reason}", SkippedRecordsWarning, stacklevel=2)
    return cases


# ------------------------------------------------------------------------------------------- ROME CounterFact

_ROME_KEYS = {"case_id", "requested_rewrite", "paraphrase_prompts", "neighborhood_prompts", "attribute_prompts",
              "generation_prompts"}


def _parse_rome(source: str) -> Parser:
    def parse(rec: Record, index: int) -> EditCase:
        rr = _get(rec, "requested_rewrite")
        if not isinstance(rr, dict):
            raise _Invalid("requested_rewrite", "should be an object")
        prompt = _text(rec, "requested_rewrite.prompt")
        assert prompt is not None
        _check_template(prompt, "requested_rewrite.prompt")
        extra: dict[str, Any] = {k: v for k, v in rec.items() if k not in _ROME_KEYS}
        for side in ("target_new", "target_true"):
            tid = _get(rec, f"requested_rewrite.{side}.id", required=False)
            if tid is not None:
                extra[f"{side}_id"] = tid
        return EditCase(
            case_id=_case_id(rec, index),
            subject=_text(rec, "requested_rewrite.subject"),  # type: ignore[arg-type]
            prompt=prompt,
            target_new=_text(rec, "requested_rewrite.target_new.str", strip=True),  # type: ignore[arg-type]
            target_true=_text(rec, "requested_rewrite.target_true.str", required=False, strip=True),
            paraphrase_prompts=_texts(rec, "paraphrase_prompts"),
            neighborhood_prompts=_texts(rec, "neighborhood_prompts"),
            attribute_prompts=_texts(rec, "attribute_prompts"),
            generation_prompts=_texts(rec, "generation_prompts"),
            relation_id=_text(rec, "requested_rewrite.relation_id", required=False),
            source=source,
            extra=extra,
        )
    return parse


def load_counterfact_rome(path: str | os.PathLike[str], *, limit: int | None = None, skip_invalid: bool = False,
                          source: str = "counterfact") -> LoadedCases:
    """Load ROME CounterFact JSON (``requested_rewrite`` records); targets stripped, case_id as str."""
    p = Path(path)
    return _parse_all(read_json_records(p), _parse_rome(source), name=p.name, limit=limit,
                      skip_invalid=skip_invalid)


# ------------------------------------------------------------------------------------- EasyEdit / KnowEdit

_EASYEDIT_KEYS = {"case_id", "id", "prompt", "prompt_template", "subject", "target_new", "ground_truth",
                  "rephrase_prompt", "rephrase", "locality_prompt", "locality_ground_truth", "locality",
                  "attribute_prompts", "generation_prompts", "relation_id"}


def _nested_locality(value: Any) -> list[tuple[str, str]]:
    """KnowEdit ``locality: {name: [{"prompt", "ground_truth"}, ...]}`` (or a bare list) as pairs."""
    groups = value.values() if isinstance(value, dict) else [value]
    pairs: list[tuple[str, str]] = []
    for group in groups:
        items = group if isinstance(group, list) else [group]
        for item in items:
            if not isinstance(item, dict) or "prompt" not in item:
                raise _Invalid("locality", "should map names to lists of {'prompt', 'ground_truth'} objects")
            prompts = item["prompt"] if isinstance(item["prompt"], list) else [item["prompt"]]
            answers = item.get("ground_truth")
            answers = answers if isinstance(answers, list) and len(prompts) > 1 else [answers] * len(prompts)
            if len(answers) != len(prompts):
                raise _Invalid("locality", "has prompt and ground_truth lists of different lengths")
            for p, a in zip(prompts, answers):
                answer = _first_text(a, "locality")
                if isinstance(p, str) and p.strip() and answer is not None:
                    pairs.append((p, answer))
    return pairs


def _parse_easyedit(source: str) -> Parser:
    def parse(rec: Record, index: int) -> EditCase:
        prompt = _text(rec, "prompt")
        subject = _text(rec, "subject")
        assert prompt is not None and subject is not None
        template = rec.get("prompt_template")
        if not (isinstance(template, str) and _fills_to(template, subject, prompt)):
            template = _template(prompt, subject, "prompt")
        target_new = _first_text(_get(rec, "target_new"), "target_new")
        if target_new is None:
            raise _Invalid("target_new", "is empty")
        target_true = _first_text(_get(rec, "ground_truth", required=False), "ground_truth")

        rephrase_key = "rephrase_prompt" if "rephrase_prompt" in rec else "rephrase"
        neighborhood: list[str] = []
        locality: list[tuple[str, str]] = []
        loc_prompts = _texts(rec, "locality_prompt")
        if loc_prompts:
            raw = _get(rec, "locality_ground_truth", required=False)
            answers: list[Any] = raw if isinstance(raw, list) and len(loc_prompts) > 1 else [raw] * len(loc_prompts)
            if len(answers) != len(loc_prompts):
                raise _Invalid("locality_ground_truth", "has a different length than field 'locality_prompt'")
            for p, a in zip(loc_prompts, answers):
                answer = _first_text(a, "locality_ground_truth")
                # CounterFact-derived data: the locality answer is the case's true target -> neighbourhood prompt
                if answer == target_true:
                    neighborhood.append(p)
                elif answer is None:
                    raise _Invalid("locality_ground_truth", "is missing (needed for field 'locality_prompt')")
                else:
                    locality.append((p, answer))
        if rec.get("locality") is not None:
            locality.extend(_nested_locality(rec["locality"]))

        extra = {k: v for k, v in rec.items() if k not in _EASYEDIT_KEYS}
        return EditCase(
            case_id=_case_id(rec, index),
            subject=subject,
            prompt=template,
            target_new=target_new,
            target_true=target_true,
            paraphrase_prompts=_texts(rec, rephrase_key),
            neighborhood_prompts=tuple(neighborhood),
            attribute_prompts=_texts(rec, "attribute_prompts"),
            generation_prompts=_texts(rec, "generation_prompts"),
            locality=tuple(locality),
            relation_id=_text(rec, "relation_id", required=False),
            source=source,
            extra=extra,
        )
    return parse


def load_easyedit(path: str | os.PathLike[str], *, limit: int | None = None, skip_invalid: bool = False,
                  source: str = "easyedit") -> LoadedCases:
    """Load EasyEdit / KnowEdit / HardEdit records (``prompt`` with the subject filled in, ``target_new``...).

    ``locality_prompt`` pairs whose answer equals ``ground_truth`` become neighbourhood prompts (CounterFact
    semantics); others, and KnowEdit's nested ``locality`` groups, become ``locality`` pairs. ``portability`` and
    any other unknown keys go to ``extra``.
    """
    p = Path(path)
    return _parse_all(read_json_records(p), _parse_easyedit(source), name=p.name, limit=limit,
                      skip_invalid=skip_invalid)


def load_hardedit(path: str | os.PathLike[str], *, limit: int | None = None,
                  skip_invalid: bool = False) -> LoadedCases:
    """Load HardEdit files (EasyEdit-style records) with ``source="hardedit"``."""
    return load_easyedit(path, limit=limit, skip_invalid=skip_invalid, source="hardedit")


def _easyedit_record(case: EditCase) -> Record:
    """One case as an EasyEdit/HardEdit record that :func:`load_easyedit` reads back to an equal case."""
    prompt = case.rewrite_prompt
    rec: Record = {"case_id": case.case_id, "prompt": prompt, "subject": case.subject,
                   "target_new": case.target_new}
    i = prompt.find(case.subject)
    if i < 0 or _escape(prompt[:i]) + "{}" + _escape(prompt[i + len(case.subject):]) != case.prompt:
        rec["prompt_template"] = case.prompt
    if case.target_true is not None:
        rec["ground_truth"] = case.target_true

    def put(key: str, values: Sequence[Any]) -> None:
        if values:
            rec[key] = values[0] if len(values) == 1 else list(values)

    put("rephrase_prompt", case.paraphrase_prompts)
    put("locality_prompt", case.neighborhood_prompts)
    if case.neighborhood_prompts:
        rec["locality_ground_truth"] = case.target_true
    if case.locality:
        rec["locality"] = {"Locality": [{"prompt": p, "ground_truth": a} for p, a in case.locality]}
    put("attribute_prompts", case.attribute_prompts)
    put("generation_prompts", case.generation_prompts)
    if case.relation_id is not None:
        rec["relation_id"] = case.relation_id
    for k, v in case.extra.items():
        if k in rec or k in _EASYEDIT_KEYS:
            continue
        try:
            json.dumps(v)
        except (TypeError, ValueError):
            continue
        rec[k] = v
    return rec


def save_easyedit(cases: Iterable[EditCase], path: str | os.PathLike[str]) -> Path:
    """Write cases as an EasyEdit/HardEdit JSON list (round-trips with :func:`load_easyedit`); returns the path.

    Neighbourhood prompts go to ``locality_prompt`` with ``locality_ground_truth`` = the true target; other
    locality pairs go to KnowEdit's nested ``locality`` form; attribute/generation prompts, relation_id and
    JSON-serialisable ``extra`` entries are kept as extra keys. ``prompt_template`` is written only when the
    subject occurs before the placeholder, where the first-occurrence rule would pick the wrong span.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    records = [_easyedit_record(c) for c in cases]
    p.write_text(json.dumps(records, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return p


# ------------------------------------------------------------------------------------------------ MEND zsRE

_ZSRE_KEYS = {"case_id", "subject", "src", "alt", "answers", "rephrase", "loc", "loc_ans"}


def _parse_zsre(source: str) -> Parser:
    def parse(rec: Record, index: int) -> EditCase:
        src = _text(rec, "src")
        subject = _text(rec, "subject")
        assert src is not None and subject is not None
        template = _template(src, subject, "src")
        alt = _get(rec, "alt")
        if not isinstance(alt, str):
            raise _Invalid("alt", f"should be a string, got {type(alt).__name__}")
        if not alt.strip():
            raise _Invalid("alt", "(the edit target) is empty")
        answers = _get(rec, "answers", required=False)
        if answers is not None and not isinstance(answers, (list, str)):
            raise _Invalid("answers", "should be a list of strings")
        locality: tuple[tuple[str, str], ...] = ()
        loc = _text(rec, "loc", required=False)
        if loc is not None:
            loc_ans = _text(rec, "loc_ans", strip=True)
            locality = ((loc, loc_ans),)  # type: ignore[assignment]
        return EditCase(
            case_id=_case_id(rec, index),
            subject=subject,
            prompt=template,
            target_new=alt.strip(),
            target_true=_first_text(answers, "answers"),
            paraphrase_prompts=_texts(rec, "rephrase"),
            locality=locality,
            source=source,
            extra={k: v for k, v in rec.items() if k not in _ZSRE_KEYS},
        )
    return parse


def load_zsre(path: str | os.PathLike[str], *, limit: int | None = None, skip_invalid: bool = False,
              source: str = "zsre") -> LoadedCases:
    """Load MEND zsRE records: template = ``src`` with the subject as ``{}`` (the question is kept as the prompt,
    as EasyEdit does), target_new = ``alt`` stripped, target_true = ``answers[0]``, locality = (loc, loc_ans)."""
    p = Path(path)
    return _parse_all(read_json_records(p), _parse_zsre(source), name=p.name, limit=limit,
                      skip_invalid=skip_invalid)


# ------------------------------------------------------------------------------------------------- dispatch

def sniff_format(record: Any) -> str:
    """'rome', 'zsre', 'knowedit', 'qaedit' or 'easyedit' from one record's keys; DataError when none fits.

    KnowEdit: WikiBio's ``text``/``labels``/``concept``, or EasyEdit-style records with KnowEdit's ``portability``
    groups; QAEdit: ``prompt``/``subject``/``target`` (no ``target_new``), as its authors distribute it."""
    if isinstance(record, dict):
        if "requested_rewrite" in record:
            return "rome"
        if "src" in record and "alt" in record:
            return "zsre"
        if {"text", "labels", "concept"} <= set(record):
            return "knowedit"
        if "prompt" in record and "target_new" in record:
            return "knowedit" if isinstance(record.get("portability"), dict) else "easyedit"
        if {"prompt", "subject", "target"} <= set(record):
            return "qaedit"
        keys = ", ".join(sorted(map(str, record))[:12])
    else:
        keys = f"a {type(record).__name__}, not an object"
    raise DataError(f"unrecognised edit format (first record has keys: {keys}); expected ROME CounterFact "
                    "('requested_rewrite'), zsRE ('src', 'alt'), EasyEdit ('prompt', 'target_new'), KnowEdit "
                    "(with 'portability', or WikiBio's 'text', 'labels', 'concept') or QAEdit ('prompt', 'subject', "
                    "'target') records; or name the format: --dataset qaedit or zsre-qa (from the data dir), "
                    "knowedit:FILE")


_PARSERS: dict[str, Callable[[str], Parser]] = {"rome": _parse_rome, "zsre": _parse_zsre,
                                                "easyedit": _parse_easyedit}
_DEFAULT_SOURCE = {"rome": "counterfact", "zsre": "zsre", "easyedit": "easyedit"}


def _load_sniffed(records: list[Any], name: str, *, limit: int | None, skip_invalid: bool,
                  source: str | None = None, path: Path | None = None) -> LoadedCases:
    """Records of a sniffed format. A KnowEdit or QAEdit file (``path``) is read by the loader its module registers
    for ``knowedit:FILE`` / ``qaedit``, so a path and the prefixed spec give the same cases; records from the hub
    keep the EasyEdit reading of KnowEdit records (QAEdit ones must be saved to a file)."""
    if not records:
        raise DataError(f"{name}: contains no records")
    try:
        fmt = sniff_format(records[0])
    except DataError as e:
        raise DataError(f"{name}: {e}") from None
    loader = {"knowedit": PREFIX_LOADERS.get("knowedit"), "qaedit": SET_LOADERS.get("qaedit")}.get(fmt)
    if loader is not None and path is not None:
        return loader(path, limit=limit, skip_invalid=skip_invalid)
    if fmt == "qaedit":
        raise DataError(f"{name}: QAEdit records; save them as a JSON file and pass its path as --dataset")
    fmt = "easyedit" if fmt == "knowedit" else fmt
    return _parse_all(records, _PARSERS[fmt](source or _DEFAULT_SOURCE[fmt]), name=name, limit=limit,
                      skip_invalid=skip_invalid)


def _load_hf(spec: str, *, limit: int | None, skip_invalid: bool) -> LoadedCases:
    """``hf:owner/name[:split]`` through the optional ``datasets`` package."""
    name, _, split = spec[3:].partition(":")
    if not name:
        raise DataError(f"dataset {spec!r}: expected hf:owner/name[:split]")
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError:
        raise DataError(f"dataset {spec!r} needs the 'datasets' package: pip install datasets "
                        "(or download the data and pass the JSON file path)") from None
    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as e:  # network, missing dataset, bad split: all reported the same way
        raise DataError(f"dataset {spec!r}: cannot load from the Hugging Face hub "
                        f"({_one_line(e)[:300]}); check the name/split or that you are online") from None
    records = [dict(r) for r in ds]
    return _load_sniffed(records, spec, limit=limit, skip_invalid=skip_invalid, source=f"hf:{name}")


def _scored_texts(case: EditCase) -> list[tuple[str, str]]:
    """(what, text) of every prompt a suite may feed the model for ``case``, each with the target scored after it."""
    new, true = " " + case.target_new, " " + case.target_true if case.target_true else ""
    out = [("rewrite", case.rewrite_prompt + new), ("rewrite", case.rewrite_prompt + true)]
    out += [("paraphrase", p + new) for p in case.paraphrase_prompts]
    out += [("neighborhood", p + true) for p in case.neighborhood_prompts]
    out += [("attribute", p + new) for p in case.attribute_prompts]
    out += [("generation", p) for p in case.generation_prompts]
    out += [("locality", f"{p} {a}") for p, a in case.locality]
    portability = case.extra.get("portability")
    for items in portability.values() if isinstance(portability, dict) else ():
        out += [("portability", f"{i['prompt']} {i['answers'][0]}") for i in items
                if isinstance(i, dict) and isinstance(i.get("prompt"), str) and i.get("answers")]
    return out


def fit_context(cases: Sequence[EditCase], tokenizer: Any, limit: int | None, *, name: str,
                skip_invalid: bool = False) -> LoadedCases:
    """``cases`` checked against the model's context window (``limit`` tokens; None: unknown, nothing checked):
    every prompt of a case (with the target scored after it) must fit, else a one-line :class:`DataError` naming the
    case id, the prompt, its token count and the limit, before any editor sees the case. With ``skip_invalid`` such
    a case is left out (``.skipped``, its ``index`` the position among ``cases``; one
    :class:`SkippedRecordsWarning`), like a malformed record. Texts shorter in bytes than the limit cannot exceed it
    and are not tokenized."""
    kept = LoadedCases(skipped=getattr(cases, "skipped", ()))
    if limit is None:
        kept.extend(cases)
        return kept
    left_out: list[SkippedRecord] = []
    for i, case in enumerate(cases):
        long = [(what, t) for what, t in _scored_texts(case) if len(t.encode("utf-8")) + 8 > limit]
        counts = [len(ids) for ids in tokenizer([t for _, t in long], verbose=False).input_ids] if long else []
        over = [(n, what, t) for n, (what, t) in zip(counts, long) if n > limit]
        if not over:
            kept.append(case)
            continue
        n, what, text = max(over)
        msg = _one_line(f"{name}: case {case.case_id}: its {what} prompt {text[:60]!r} has {n} tokens, more than the "
                        f"model's context of {limit}; shorten it or leave the case out")
        if not skip_invalid:
            raise DataError(f"{msg} (--skip-invalid)")
        left_out.append(SkippedRecord(name, i, f"case_id {case.case_id}", what, msg))
    if left_out and not kept:
        raise DataError(f"{name}: all {len(left_out)} case(s) are longer than the model's context of {limit} tokens "
                        f"(first: {left_out[0].reason}); give another --dataset")
    if left_out:
        kept.skipped.extend(left_out)
        warnings.warn(f"{name}: left out {len(left_out)} case(s) longer than the model's context of {limit} tokens "
                      f"(--skip-invalid); first: {left_out[0].reason}", SkippedRecordsWarning, stacklevel=2)
    return kept


def dataset_names() -> list[str]:
    """Named edit sets accepted by :func:`load_cases` (besides file paths, ``hf:`` and ``PREFIX:FILE`` specs)."""
    return [*BUILTIN_SETS, *NAMED_SETS, *(f"{p}:FILE" for p in PREFIX_LOADERS)]


def load_cases(spec: str = "builtin", *, data_dir: str | os.PathLike[str] | None = None,
               limit: int | None = None, skip_invalid: bool = False) -> LoadedCases:
    """Load edit cases from a named set, a file path (format sniffed) or ``hf:owner/name[:split]``."""
    spec = str(spec)
    if spec in BUILTIN_SETS:
        return load_counterfact_rome(BUILTIN_DIR / BUILTIN_SETS[spec], limit=limit, skip_invalid=skip_invalid,
                                     source=spec)
    if spec in NAMED_SETS:
        rel = NAMED_SETS[spec]
        root = resolve_data_dir(data_dir)
        if root is None:
            raise DataError(f"dataset {spec!r} needs a data dir: pass --data-dir DIR (or set {DATA_DIR_ENV}) "
                            f"pointing at a folder with {rel}")
        path = root / rel
        if not path.is_file():
            raise DataError(f"dataset {spec!r}: {path} not found; pass --data-dir DIR (or set {DATA_DIR_ENV}) "
                            f"pointing at a folder with {rel}")
        if spec in SET_LOADERS:
            return SET_LOADERS[spec](path, limit=limit, skip_invalid=skip_invalid)
        if spec == "zsre":
            return load_zsre(path, limit=limit, skip_invalid=skip_invalid)
        if spec == "counterfact":
            return load_counterfact_rome(path, limit=limit, skip_invalid=skip_invalid)
        return load_easyedit(path, limit=limit, skip_invalid=skip_invalid, source="counterfact-easyedit")
    if spec.startswith("hf:"):
        return _load_hf(spec, limit=limit, skip_invalid=skip_invalid)
    prefix, sep, rest = spec.partition(":")
    if sep and prefix in PREFIX_LOADERS:
        if not rest:
            raise DataError(f"dataset {spec!r}: expected {prefix}:FILE (a path to the {prefix} JSON file)")
        return PREFIX_LOADERS[prefix](Path(rest).expanduser(), limit=limit, skip_invalid=skip_invalid)
    path = Path(spec).expanduser()
    if path.is_file():
        return _load_sniffed(read_json_records(path), path.name, limit=limit, skip_invalid=skip_invalid, path=path)
    if path.suffix in (".json", ".jsonl") or os.sep in spec or "/" in spec:
        raise DataError(f"{spec}: file not found")
    raise DataError(f"unknown dataset {spec!r}: use one of {', '.join(dataset_names())}, a JSON file path "
                    "or hf:owner/name[:split]")
