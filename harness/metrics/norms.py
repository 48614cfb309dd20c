"""Norms of the edited layers and the correlations the D4S paper reports between them and editing accuracy.

Huang et al. (2024) track the L1 norm of each edited weight during a sequential stream and find that it grows with
the number of edits while editing accuracy falls (a strong correlation), and that D4S keeps it small. The paper's
text calls it the L1 norm, sum |W|; its code (``easyeditor/editors/editor.py`` of github.com/nlpkeg/D4S) logs
``torch.norm(W, p=1) / W.numel()``, the mean |W|. Both are measured here: ``l1`` (sum |W|, summed over the edited
weights for a whole-stream figure) and ``mean_abs`` (the paper's logged value, per weight). Growth ratios are the
same for both on one weight; summed over several weights, ``l1`` weights each layer by its size.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn


def l1_norm(weight: torch.Tensor) -> float:
    """sum |W| (accumulated in float64, so that a growth of 1e-4 of a large matrix is not rounding noise)."""
    return float(weight.detach().abs().sum(dtype=torch.float64))


def mean_abs(weight: torch.Tensor) -> float:
    """mean |W| = sum |W| / numel: what the D4S code logs as the layer's L1 norm."""
    return l1_norm(weight) / weight.numel()


def weight_norms(model: nn.Module, names: Iterable[str]) -> dict[str, dict[str, float]]:
    """Per named parameter: ``l1`` (sum |W|) and ``mean_abs``. KeyError naming a parameter the model lacks."""
    params = dict(model.named_parameters())
    out: dict[str, dict[str, float]] = {}
    for name in dict.fromkeys(names):
        if name not in params:
            raise KeyError(f"no parameter named {name!r} in {type(model).__name__}; pass the edited weights' names "
                           "(editor.edited_parameters(lm))")
        l1 = l1_norm(params[name])
        out[name] = {"l1": l1, "mean_abs": l1 / params[name].numel()}
    return out


def total_l1(norms: Mapping[str, Mapping[str, float]]) -> float:
    """sum |W| over every weight of a :func:`weight_norms` result (the edited layers' L1 norm)."""
    return sum(v["l1"] for v in norms.values())


def norm_growth(before: float, after: float) -> float:
    """after / before (inf when a zero norm grew, nan when both are zero)."""
    if before == 0:
        return math.nan if after == 0 else math.inf
    return after / before


# ------------------------------------------------------------------------------------------------ correlation

@dataclass(frozen=True)
class Correlation:
    """Spearman's rank and Pearson's linear correlation of two paired series, over ``n`` finite pairs. A
    coefficient is None when it is undefined: fewer than 3 pairs, or a constant series (e.g. a norm that did not
    move, or an efficacy that stayed at 1.0)."""

    spearman: float | None
    pearson: float | None
    n: int

    def to_dict(self, prefix: str = "") -> dict[str, float | int | None]:
        return {f"{prefix}spearman": self.spearman, f"{prefix}pearson": self.pearson, f"{prefix}n": self.n}


def correlation(x: Sequence[float | None], y: Sequence[float | None]) -> Correlation:
    """Spearman and Pearson of ``x`` and ``y`` (pandas: Pearson, and Pearson of average ranks, which is Spearman's
    rho with ties handled as scipy does); pairs with a None or non-finite member are dropped."""
    if len(x) != len(y):
        raise ValueError(f"correlation needs paired series, got lengths {len(x)} and {len(y)}")
    import pandas as pd

    pairs = [(float(a), float(b)) for a, b in zip(x, y)
             if a is not None and b is not None and math.isfinite(a) and math.isfinite(b)]
    n = len(pairs)
    if n < 3 or len({a for a, _ in pairs}) < 2 or len({b for _, b in pairs}) < 2:
        return Correlation(None, None, n)
    sx = pd.Series([a for a, _ in pairs])
    sy = pd.Series([b for _, b in pairs])
    return Correlation(spearman=float(sx.rank().corr(sy.rank())), pearson=float(sx.corr(sy)), n=n)
