"""Edit sets that differ only in the diversity of their targets (Huang et al., 2024, "Reasons and Solutions for the
Decline in Model Performance after Editing", the D4S paper).

The paper's finding: the more diverse the edit targets of a sequential stream, the faster the edited model declines.
Its own data set (MQD) is not available here, and the paper's code (github.com/nlpkeg/D4S) ships neither MQD nor a
reader for it (its example script reads zsRE / CounterFact records), so MQD's format cannot be established and no
reader is offered. Instead, from any edit cases (CounterFact, zsRE, the built-in set) this module builds four sets
over the *same subjects*, in the *same order*, with the *same number of edits*; only the targets change:

  ``yesno``     the fact as a statement plus "Is this correct?", target "Yes" or "No"      2 distinct targets
  ``choice``    the prompt with four options A-D listed in it, target a letter              4 distinct targets
  ``few``       the original prompt, target one of the same 4 entities reused             4 distinct targets
  ``distinct``  the original prompt and target (every target different)                    N distinct targets

(``yesno`` and ``choice`` correspond to the paper's true/false and multiple-choice questions, ``distinct`` to its
directly generated answers.) :func:`target_diversity` measures each set: distinct targets, distinct target tokens and
the Shannon entropy of targets and of target tokens.
"""
from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from .case import EditCase
from .loaders import DataError, load_cases

KINDS = ("yesno", "choice", "few", "distinct")     # least to most diverse targets
LETTERS = ("A", "B", "C", "D")
YES_NO = ("Yes", "No")
QUESTION = "\nIs this correct? Answer:"


def _escape(text: str) -> str:
    """Literal text inside a ``{}`` template (braces doubled)."""
    return text.replace("{", "{{").replace("}", "}}")


def _same(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and a.strip().lower() == b.strip().lower()


# ------------------------------------------------------------------------------------------------- diversity

@dataclass(frozen=True)
class TargetDiversity:
    """How diverse a set's edit targets are. Entropies in bits over the empirical distribution."""

    n_edits: int
    n_distinct_targets: int
    target_entropy: float                      # H(target string)
    n_distinct_target_tokens: int | None = None   # None without a tokenizer
    token_entropy: float | None = None         # H(token) over every target token of the set
    mean_target_tokens: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def entropy_bits(items: Sequence[Any]) -> float:
    """Shannon entropy (bits) of the empirical distribution of ``items``; 0 for an empty or constant list."""
    n = len(items)
    return -sum(c / n * math.log2(c / n) for c in Counter(items).values()) if n else 0.0


def target_diversity(targets: Sequence[str], tokenizer=None) -> TargetDiversity:
    """Diversity of ``targets``; token counts with ``tokenizer`` (targets encoded as they follow a prompt)."""
    strings = [t.strip() for t in targets]
    out = TargetDiversity(len(strings), len(set(strings)), entropy_bits(strings))
    if tokenizer is None:
        return out
    from ..tokens import encode_target
    ids = [encode_target(tokenizer, t) for t in strings]
    flat = [i for seq in ids for i in seq]
    return replace(out, n_distinct_target_tokens=len(set(flat)), token_entropy=entropy_bits(flat),
                   mean_target_tokens=len(flat) / len(ids) if ids else 0.0)


@dataclass(frozen=True)
class DiversitySet:
    """One edit set of a diversity family: its kind, its cases (in stream order) and what was done to build it."""

    kind: str
    cases: tuple[EditCase, ...]
    description: str

    @property
    def case_id(self) -> str:
        """The set's name in a benchmark record (``case_id``), as its cases carry it (``<id>:<kind>``)."""
        return self.kind

    subject = None                     # a record's subject: a set has many

    @property
    def targets(self) -> list[str]:
        return [c.target_new for c in self.cases]

    def diversity(self, tokenizer=None) -> TargetDiversity:
        return target_diversity(self.targets, tokenizer)


# -------------------------------------------------------------------------------------------------- building

def select_distinct(cases: Sequence[EditCase], n: int) -> list[EditCase]:
    """The first ``n`` cases (in order) whose ``target_new`` differ pairwise and that have a ``target_true`` other
    than ``target_new``; the subjects every set of the family shares. DataError when fewer than ``n`` exist."""
    if n < 1:
        raise DataError(f"diversity sets need at least 1 edit, got {n}")
    chosen: list[EditCase] = []
    seen: set[str] = set()
    for c in cases:
        key = c.target_new.strip().lower()
        if key in seen or c.target_true is None or _same(c.target_new, c.target_true):
            continue
        seen.add(key)
        chosen.append(c)
        if len(chosen) == n:
            return chosen
    raise DataError(f"only {len(chosen)} of {len(cases)} cases have distinct targets and a true answer, fewer than "
                    f"the {n} edits asked for; pass a smaller number of edits or a larger data set (--data-dir)")


def _yesno(case: EditCase, i: int) -> EditCase:
    """Even positions assert the new target ("Yes" edits it in), odd ones the true target ("No" edits it out), so
    the set's targets are balanced; neighbours get the same statement, whose correct answer is the true one."""
    stated = case.target_new if i % 2 == 0 else case.target_true
    assert stated is not None
    new, true = YES_NO if i % 2 == 0 else YES_NO[::-1]

    def ask(text: str) -> str:
        return f"{text} {stated}.{QUESTION}"
    return replace(case, case_id=f"{case.case_id}:yesno", prompt=f"{case.prompt} {_escape(stated)}.{QUESTION}",
                   target_new=new, target_true=true, paraphrase_prompts=tuple(map(ask, case.paraphrase_prompts)),
                   neighborhood_prompts=tuple(map(ask, case.neighborhood_prompts)), attribute_prompts=(),
                   generation_prompts=(), locality=(), extra={**case.extra, "diversity_kind": "yesno",
                                                             "stated_target": stated})


def _distractors(case: EditCase, pool: Sequence[EditCase], rng: random.Random, k: int = 2) -> list[str]:
    """``k`` other answers for a multiple-choice question: targets of other cases, the same relation first."""
    taken = {case.target_new.strip().lower(), (case.target_true or "").strip().lower()}
    ranked = sorted(pool, key=lambda c: (c.relation_id != case.relation_id or case.relation_id is None, rng.random()))
    out: list[str] = []
    for c in ranked:
        for t in (c.target_new, c.target_true):
            if t is not None and t.strip().lower() not in taken:
                taken.add(t.strip().lower())
                out.append(t.strip())
            if len(out) == k:
                return out
    raise DataError(f"case {case.case_id}: not enough other targets in the pool for {k} multiple-choice distractors")


def _choice(case: EditCase, i: int, pool: Sequence[EditCase], rng: random.Random) -> EditCase:
    """Options A-D in the prompt; target_new's letter cycles A, B, C, D over the stream (balanced letters), the
    true answer and two distractors take the other letters in a seeded order."""
    assert case.target_true is not None
    others = [case.target_true, *_distractors(case, pool, rng)]
    rng.shuffle(others)
    options = others[:]
    options.insert(i % 4, case.target_new)
    listing = "".join(f"\n{letter}. {opt}" for letter, opt in zip(LETTERS, options))
    new, true = LETTERS[i % 4], LETTERS[options.index(case.target_true)]

    def ask(text: str) -> str:
        return f"{text}{listing}\nAnswer:"
    return replace(case, case_id=f"{case.case_id}:choice", prompt=f"{case.prompt}{_escape(listing)}\nAnswer:",
                   target_new=new, target_true=true, paraphrase_prompts=tuple(map(ask, case.paraphrase_prompts)),
                   neighborhood_prompts=tuple(map(ask, case.neighborhood_prompts)), attribute_prompts=(),
                   generation_prompts=(), locality=(), extra={**case.extra, "diversity_kind": "choice",
                                                             "options": options})


def few_objects(pool: Sequence[EditCase], k: int = 4) -> list[str]:
    """The ``k`` most frequent ``target_new`` strings of ``pool`` (ties: first seen first)."""
    counts = Counter(c.target_new.strip() for c in pool)
    objects = [t for t, _ in counts.most_common(k)]
    if len(objects) < k:
        raise DataError(f"the pool has only {len(objects)} distinct targets; the 'few' set needs {k}")
    return objects


def _few(case: EditCase, i: int, objects: Sequence[str]) -> EditCase:
    """The original prompts with target_new = objects[i mod k], skipping an object that is the true answer."""
    k = len(objects)
    obj = next(objects[(i + j) % k] for j in range(k) if not _same(objects[(i + j) % k], case.target_true))
    return replace(case, case_id=f"{case.case_id}:few", target_new=obj, attribute_prompts=(), generation_prompts=(),
                   extra={**case.extra, "diversity_kind": "few", "original_target": case.target_new})


def build_diversity_sets(cases: Sequence[EditCase], n: int, *, kinds: Sequence[str] = KINDS,
                         objects: Sequence[str] | None = None, seed: int = 0) -> dict[str, DiversitySet]:
    """The diversity family of ``n`` edits from ``cases``: the subjects of :func:`select_distinct`, one set per kind
    (in ``KINDS`` order). ``objects`` are the entities the ``few`` set reuses (default: the pool's 4 most frequent
    targets); ``seed`` fixes the multiple-choice distractors and their order."""
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise DataError(f"unknown diversity set {unknown[0]!r}; use some of {', '.join(KINDS)}")
    base = select_distinct(cases, n)
    objs = list(objects) if objects is not None else few_objects(cases)
    if len({o.strip().lower() for o in objs}) < 2:
        raise DataError("the 'few' set needs at least 2 distinct objects")
    rng = random.Random(seed)
    built = {
        "yesno": lambda: DiversitySet("yesno", tuple(_yesno(c, i) for i, c in enumerate(base)),
                                      "statement + 'Is this correct?', target Yes/No (balanced)"),
        "choice": lambda: DiversitySet("choice", tuple(_choice(c, i, cases, rng) for i, c in enumerate(base)),
                                       "options A-D in the prompt, target a letter (balanced)"),
        "few": lambda: DiversitySet("few", tuple(_few(c, i, objs) for i, c in enumerate(base)),
                                    f"original prompts, target one of {len(objs)} entities: {', '.join(objs)}"),
        "distinct": lambda: DiversitySet("distinct", tuple(replace(c, case_id=f"{c.case_id}:distinct") for c in base),
                                         "original prompts and targets, all targets distinct"),
    }
    return {k: built[k]() for k in KINDS if k in kinds}


def load_diversity_sets(spec: str = "builtin", n: int = 20, *, data_dir: str | None = None,
                        kinds: Sequence[str] = KINDS, skip_invalid: bool = False,
                        seed: int = 0) -> dict[str, DiversitySet]:
    """:func:`build_diversity_sets` over a whole named set or file (see :func:`harness.data.load_cases`)."""
    pool = load_cases(spec, data_dir=data_dir, limit=None, skip_invalid=skip_invalid)
    try:
        return build_diversity_sets(pool, n, kinds=kinds, seed=seed)
    except DataError as e:
        raise DataError(f"dataset {spec!r}: {e}") from None
