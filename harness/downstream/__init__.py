"""Downstream evaluation after editing: lm-eval task YAMLs reading local files (``tasks/``, ``data.py``), the
evaluator that wraps the in-memory model (``evaluator.py``; lm-eval is the optional ``downstream`` extra and is
imported only when scoring), and the perplexity-accuracy correlation over edited states (``correlation.py``)."""
from .correlation import StateSeries, pearson, spearman
from .evaluator import (
                        TASKS_DIR,
                        DownstreamEvaluator,
                        DownstreamUnavailable,
                        TaskScore,
                        UnknownTaskError,
                        downstream_metrics,
                        parse_tasks,
                        task_info,
                        task_names,
)

__all__ = [
                        "TASKS_DIR",
                        "DownstreamEvaluator",
                        "DownstreamUnavailable",
                        "StateSeries",
                        "TaskScore",
                        "UnknownTaskError",
                        "downstream_metrics",
                        "parse_tasks",
                        "pearson",
                        "spearman",
                        "task_info",
                        "task_names",
]
