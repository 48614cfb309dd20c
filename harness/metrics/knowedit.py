"""KnowEdit's portability and grouped locality, scored as EasyEdit scores them (``compute_portability_quality``,
``compute_locality_quality`` and the averaging of ``examples/run_knowedit_llama2.py``).

* **portability** of a group (Reasoning, Subject_Aliasing, Logical_Generalization): for each (prompt, answer) the
  teacher-forced argmax accuracy of the answer's tokens after the prompt on the *edited* model (EasyEdit's
  ``test_prediction_acc``; the answer is the first alias), averaged over the group's prompts.
  ``portability`` is the mean over the case's groups (run_knowedit's per-case mean of group means).
* **locality** of a group (Relation_Specificity, Forgetfulness): for each (prompt, answer) the fraction of answer
  positions whose teacher-forced argmax token is the same after the edit as before (EasyEdit's ``_output``
  comparison), averaged over the group; ``knowedit_locality`` is the mean over groups.
* ``wild_portability``: the WILD version of portability (greedy generation, natural stop): the fraction of
  portability prompts whose generated answer contains any alias of the answer.

The answer is tokenised apart from the prompt, with a leading space (``harness.tokens.encode_target``), as every
teacher-forced metric of this harness does; EasyEdit tokenises ``prompt + " " + answer`` together, which differs only
where a tokenizer merges across that space.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from statistics import fmean
from typing import Any

from ..data.knowedit import locality_items, portability_items
from ..locality import answer_argmax
from .scoring import score_targets
from .wild import generate_greedy
from .wild import score as wild_score

PROTOCOLS: dict[str, str] = {
    "portability": "easyedit-teacher-forced: mean over portability groups of the mean argmax accuracy of the answer",
    "knowedit_locality": "easyedit locality: mean over locality groups of the fraction of answer positions whose "
                         "teacher-forced argmax is unchanged by the edit",
    "wild_portability": "wild: fraction of portability prompts whose greedy answer contains an alias of the answer",
}

# For the metric registry (``MetricSpec`` keyword arguments); ``{group}`` names are families.
METRIC_SPECS: tuple[dict[str, Any], ...] = (
    dict(name="portability", protocol=PROTOCOLS["portability"], higher_is_better=True, label="portability",
         description="KnowEdit portability, mean over groups", unit="fraction"),
    dict(name="portability_{group}", protocol=PROTOCOLS["portability"], higher_is_better=True,
         label="portability {group}", description="KnowEdit portability of the {group} prompts", unit="fraction"),
    dict(name="knowedit_locality", protocol=PROTOCOLS["knowedit_locality"], higher_is_better=True,
         label="KnowEdit locality", description="KnowEdit locality, mean over groups", unit="fraction"),
    dict(name="locality_{group}", protocol=PROTOCOLS["knowedit_locality"], higher_is_better=True,
         label="locality {group}", description="KnowEdit locality of the {group} prompts", unit="fraction"),
    dict(name="wild_portability", protocol=PROTOCOLS["wild_portability"], higher_is_better=True,
         label="WILD portability", description="portability prompts answered (containment), generating",
         unit="fraction"),
)


def metric_name(kind: str, group: str) -> str:
    """``portability_reasoning``, ``locality_relation_specificity``: group names as metric-name suffixes."""
    return f"{kind}_{re.sub(r'[^0-9a-z]+', '_', group.lower()).strip('_')}"


def portability(model, tok, case, *, prefix: str = "") -> dict[str, float]:
    """Per-group and overall portability of the (edited) model on ``case``; empty for cases without portability."""
    groups = portability_items(case)
    if not groups:
        return {}
    flat = [(g, p, answers[0]) for g, items in groups.items() for p, answers in items]
    scores = score_targets(model, tok, [p for _, p, _ in flat], [a for _, _, a in flat], prefix=prefix)
    per_group: dict[str, list[float]] = {}
    for (g, _, _), s in zip(flat, scores):
        per_group.setdefault(g, []).append(s.token_accuracy)
    out = {metric_name("portability", g): fmean(v) for g, v in per_group.items()}
    out["portability"] = fmean(out.values())
    return out


Outputs = Mapping[str, Sequence[tuple[list[int], list[int]]]]


def locality_outputs(model, tok, case, *, prefix: str = "") -> dict[str, list[tuple[list[int], list[int]]]]:
    """Teacher-forced argmax tokens (and answer tokens) per locality group: call before and after the edit."""
    return {g: answer_argmax(model, tok, pairs, prefix=prefix) for g, pairs in locality_items(case).items()}


def grouped_locality(pre: Outputs, post: Outputs) -> dict[str, float]:
    """Per-group and overall (``knowedit_locality``) agreement of post-edit with pre-edit argmax tokens."""
    out: dict[str, float] = {}
    for g, pre_items in pre.items():
        agree = [fmean(float(a == b) for a, b in zip(p[0], q[0])) for p, q in zip(pre_items, post[g]) if p[0]]
        if agree:
            out[metric_name("locality", g)] = fmean(agree)
    if out:
        out["knowedit_locality"] = fmean(out.values())
    return out


def wild_portability(model, tok, case, *, prefix: str = "", **generate_kwargs) -> dict[str, float]:
    """WILD portability: greedy answers to the portability prompts, containment of any alias."""
    flat = [(p, answers) for items in portability_items(case).values() for p, answers in items]
    if not flat:
        return {}
    gens = generate_greedy(model, tok, [p for p, _ in flat], prefix=prefix, **generate_kwargs)
    return {"wild_portability": fmean(float(s.contains) for s in wild_score(gens, [a for _, a in flat]))}
