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


def downstream_series(session, editor, cases, tasks: Sequence[str], limit: int | None, timer) -> StateSeries:
    """A sequential run of ``cases`` (one edit at a time, no restore in between; the model is restored after),
    with perplexity and downstream accuracy measured on the base model and after every edit.

    The sequential run is :class:`harness.sequential.SequentialRun` (journaled under ``REPORT_DIR/correlation``,
    never resumed: every state must be measured); its perplexity callback is the probe that measures a state."""
    from pathlib import Path

    from ..sequential import SequentialRun
    from ..timing import PhaseTimer

    evaluator = session.downstream
    series = StateSeries()
    base = evaluator.base(tasks, limit)
    series.add(0, session.base_perplexity().mean_ppl, {t: s.value for t, s in base.items()})

    def probe() -> float:
        with timer.phase("perplexity"):
            ppl = session.perplexity().mean_ppl
        with timer.phase("downstream"):
            scores = evaluator.evaluate(tasks, limit)
        series.add(len(series.states), ppl, {t: s.value for t, s in scores.items()})
        return ppl

    inner = PhaseTimer(session.lm.device)        # its "perplexity" phase is the probe, timed above
    run = SequentialRun(session.lm, editor, cases, perplexity=probe, ppl_base=series.states[0]["ppl"],
                        journal_dir=Path(session.options.report_dir) / "correlation", batch_size=1,
                        ppl_schedule="every", resume=False, progress=session.options.progress)
    run.run(inner)
    for k, v in inner.seconds.items():
        if k != "perplexity":
            timer.seconds[k] = timer.seconds.get(k, 0.0) + v
    return series
