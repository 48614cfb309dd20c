"""Does perplexity track downstream accuracy? Over a series of edited states (the base model, then after each edit
of a sequential run), the Spearman rank correlation and the Pearson correlation between perplexity and each task's
accuracy, as the collapse papers report (Yang et al., 2024; Gupta et al., 2024). A collapsing model shows a strong
negative correlation: perplexity up, accuracy down to chance.

Pearson is computed on perplexity as measured (``ppl_downstream_pearson_<task>``) and on log perplexity
(``logppl_downstream_pearson_<task>``), since perplexity spans orders of magnitude once a model collapses and the
raw Pearson is then dominated by the last state. Spearman is the same for both. States whose perplexity is not
finite are left out. A correlation is None when fewer than three states remain or either series is constant.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class StateSeries:
    """(n_edits, perplexity, accuracy per task) at each edited state."""

    states: list[dict[str, Any]] = field(default_factory=list)

    def add(self, n_edits: int, ppl: float, accuracy: dict[str, float]) -> None:
        self.states.append({"n_edits": n_edits, "ppl": ppl, "accuracy": dict(accuracy)})

    def tasks(self) -> list[str]:
        return sorted({t for s in self.states for t in s["accuracy"]})

    def correlations(self) -> dict[str, float | None]:
        """``ppl_downstream_spearman_<task>``, ``ppl_downstream_pearson_<task>``, ``logppl_downstream_pearson_<task>``
        and ``corr_states_<task>`` (states used)."""
        out: dict[str, float | None] = {}
        for t in self.tasks():
            pts = [(s["ppl"], s["accuracy"][t]) for s in self.states
                   if t in s["accuracy"] and s["ppl"] is not None and math.isfinite(s["ppl"]) and s["ppl"] > 0]
            ppl, acc = [p for p, _ in pts], [a for _, a in pts]
            out[f"ppl_downstream_spearman_{t}"] = spearman(ppl, acc)
            out[f"ppl_downstream_pearson_{t}"] = pearson(ppl, acc)
            out[f"logppl_downstream_pearson_{t}"] = pearson([math.log(p) for p in ppl], acc)
            out[f"corr_states_{t}"] = len(pts)
        return out

    def to_table(self) -> list[dict[str, Any]]:
        """One row per state: n_edits, ppl, then each task's accuracy."""
        return [{"n_edits": s["n_edits"], "ppl": s["ppl"], **s["accuracy"]} for s in self.states]


def _degenerate(x: Sequence[float], y: Sequence[float]) -> bool:
    return len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2


def _corr(x: Sequence[float], y: Sequence[float], method: str) -> float | None:
    """scipy.stats when installed (it comes with lm-eval), else pandas (same values)."""
    if _degenerate(x, y):
        return None
    try:
        from scipy import stats
    except ImportError:
        import pandas as pd
        return float(pd.Series(list(x), dtype=float).corr(pd.Series(list(y), dtype=float), method=method))
    fn = stats.pearsonr if method == "pearson" else stats.spearmanr
    return float(fn(x, y).statistic)


def pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    return _corr(x, y, "pearson")


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    return _corr(x, y, "spearman")
