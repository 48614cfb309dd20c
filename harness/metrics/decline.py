"""The decline of a model over a sequential edit stream, measured as the D4S paper does (Huang et al., 2024): at
checkpoints along the stream, perplexity, the accuracy of every edit made so far, the edited layers' L1 norm and,
when measured, downstream accuracy; then how the norm tracks accuracy along one stream, and how the targets'
diversity tracks the decline across streams of the same length.

Pure functions and records: the stream itself is run by :mod:`harness.sequential`; the caller measures a checkpoint
with :func:`rewrite_efficacy`, :func:`harness.metrics.norms.weight_norms` and its perplexity / downstream callables
and adds it to a :class:`DeclineCurve`.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from statistics import fmean
from typing import Any

from ..data.case import EditCase
from .norms import correlation, norm_growth
from .scoring import score_targets


def rewrite_efficacy(model, tok, cases: Sequence[EditCase], *, prefix: str = "") -> list[float]:
    """Per case, 1.0 when P(target_new) > P(target_true) on its rewrite prompt (CounterFact's efficacy success,
    per-token-averaged probabilities), in one batched scoring pass: cheap enough to re-score every edit made so far
    at every checkpoint of a stream."""
    if any(c.target_true is None for c in cases):
        raise ValueError("rewrite efficacy needs target_true for every case")
    prompts = [c.rewrite_prompt for c in cases for _ in range(2)]
    targets = [t for c in cases for t in (c.target_new, c.target_true)]
    s = score_targets(model, tok, prompts, targets, prefix=prefix)
    return [float(s[2 * i].prob > s[2 * i + 1].prob) for i in range(len(cases))]


def target_nll(model, tok, cases: Sequence[EditCase]) -> float:
    """Mean per-token NLL (nats) of target_new on the rewrite prompts under the model as it is: how surprising the
    set's targets are before editing (the paper relates the decline to the targets' perplexity too)."""
    scores = score_targets(model, tok, [c.rewrite_prompt for c in cases], [c.target_new for c in cases])
    return fmean(s.nll_mean for s in scores)


@dataclass
class DeclinePoint:
    """The model after ``n_edits`` edits of a stream."""

    n_edits: int
    ppl: float | None                       # None when perplexity was not measured at this point
    efficacy: float | None                  # mean rewrite efficacy over edits 1..n_edits (None at n_edits = 0)
    l1: float                               # sum |W| over the edited weights
    mean_abs: dict[str, float]              # per edited weight: mean |W| (the D4S code's logged value)
    downstream: dict[str, float] = field(default_factory=dict)   # task -> accuracy


@dataclass
class DeclineCurve:
    """Checkpoints of one stream, the unedited model first (``n_edits`` 0)."""

    points: list[DeclinePoint] = field(default_factory=list)

    def add(self, point: DeclinePoint) -> None:
        if self.points and point.n_edits <= self.points[-1].n_edits:
            raise ValueError(f"checkpoints must follow the stream: {point.n_edits} after {self.points[-1].n_edits}")
        self.points.append(point)

    @property
    def base(self) -> DeclinePoint:
        if not self.points or self.points[0].n_edits != 0:
            raise ValueError("a decline curve starts with the unedited model (n_edits 0)")
        return self.points[0]

    @property
    def last(self) -> DeclinePoint:
        return self.points[-1]

    def series(self, what: str) -> list[list[float | None]]:
        """[[n_edits, value], ...] of ``ppl_ratio``, ``efficacy``, ``l1``, ``l1_growth`` or ``downstream_<task>``,
        over the checkpoints where it was measured."""
        base = self.base
        def value(p: DeclinePoint) -> float | None:
            if what == "ppl_ratio":
                return p.ppl / base.ppl if p.ppl is not None and base.ppl else None
            if what == "l1_growth":
                return norm_growth(base.l1, p.l1)
            if what.startswith("downstream_"):
                return p.downstream.get(what[len("downstream_"):])
            return getattr(p, what)
        return [[p.n_edits, v] for p in self.points if (v := value(p)) is not None]

    def norm_accuracy(self) -> dict[str, Any]:
        """Spearman / Pearson of the edited layers' L1 norm against the accuracy of the edits made so far, over the
        edited checkpoints (the paper's "strong correlation"; expected negative: norm up, accuracy down)."""
        pts = [p for p in self.points if p.n_edits > 0]
        return correlation([p.l1 for p in pts], [p.efficacy for p in pts]).to_dict("norm_efficacy_")

    def metrics(self, efficacy_immediate: Sequence[float]) -> dict[str, Any]:
        """The stream's record: the curves, the values after the last edit, growth and decline, correlations.
        ``efficacy_immediate``: each edit's own efficacy right after it was made."""
        base, last = self.base, self.last
        ppl_last = next((p for p in reversed(self.points) if p.ppl is not None), base)
        immediate = fmean(efficacy_immediate) if efficacy_immediate else None
        out: dict[str, Any] = {
            "n_edits": last.n_edits,
            "ppl_ratio_curve": self.series("ppl_ratio"), "efficacy_curve": self.series("efficacy"),
            "l1_curve": self.series("l1"), "l1_growth_curve": self.series("l1_growth"),
            "mean_abs_curve": [[p.n_edits, fmean(p.mean_abs.values()) if p.mean_abs else None] for p in self.points],
            "ppl_before": base.ppl, "ppl_after": ppl_last.ppl, "ppl_after_n": ppl_last.n_edits,
            "ppl_ratio": ppl_last.ppl / base.ppl if ppl_last.ppl is not None and base.ppl else None,
            "efficacy_immediate": immediate, "efficacy_final": last.efficacy,
            "efficacy_decline": immediate - last.efficacy if immediate is not None and last.efficacy is not None
            else None,
            "l1_before": base.l1, "l1_after": last.l1, "norm_growth": norm_growth(base.l1, last.l1),
            **self.norm_accuracy(),
        }
        ds_last = next((p for p in reversed(self.points) if p.downstream), base)
        for task in sorted(base.downstream):
            out[f"downstream_{task}_curve"] = self.series(f"downstream_{task}")
            after = ds_last.downstream.get(task)
            out[f"downstream_{task}_drop"] = base.downstream[task] - after if after is not None else None
        return out


# the per-stream values a decline is read from, each higher = worse; ``diversity_decline`` correlates them
DECLINE_MEASURES = ("ppl_ratio", "efficacy_decline", "efficacy_loss", "norm_growth")


def _decline(row: Mapping[str, Any], measure: str) -> float | None:
    if measure == "efficacy_loss":                 # 1 - accuracy of all edits after the last one
        final = row.get("efficacy_final")
        return None if final is None else 1.0 - final
    value = row.get(measure)
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def diversity_decline(rows: Sequence[Mapping[str, Any]], diversity: str = "target_entropy") -> dict[str, Any]:
    """Across streams of one editor and the same length (one row per diversity set, each with the set's
    ``diversity`` value and its :meth:`DeclineCurve.metrics`): Spearman / Pearson of diversity against each
    decline measure. The paper's finding predicts positive values (more diverse targets, more decline)."""
    lengths = {r.get("n_edits") for r in rows}
    if len(lengths) > 1:
        raise ValueError(f"diversity and decline are compared at a fixed number of edits; got streams of "
                         f"{sorted(lengths)} edits")
    x = [r.get(diversity) for r in rows]
    out: dict[str, Any] = {"diversity_measure": diversity, "n_sets": len(rows)}
    for m in DECLINE_MEASURES:
        c = correlation(x, [_decline(r, m) for r in rows])
        out[f"diversity_{m}_spearman"], out[f"diversity_{m}_pearson"] = c.spearman, c.pearson
    return out
