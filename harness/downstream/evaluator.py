"""Downstream accuracy with lm-eval (lm-evaluation-harness) on the in-memory model.

The loaded model is wrapped once in lm-eval's ``HFLM`` (edits change its weights in place, so the same wrapper scores
the edited model). Tasks are lm-eval YAMLs kept in ``harness/downstream/tasks`` that read local files from the data
dir (``custom_dataset`` functions in :mod:`harness.downstream.data`; the data dir reaches them as task metadata), so
nothing is fetched from a hub. The base-model scores are cached by the evaluator, which the session owns.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

TASKS_DIR = Path(__file__).resolve().parent / "tasks"


class DownstreamUnavailable(RuntimeError):
    """lm-eval is not installed (the suite skips with this message)."""


class UnknownTaskError(ValueError):
    pass


class _IgnoreFunctions(yaml.SafeLoader):
    """Reads the task YAMLs' plain fields without importing their ``!function`` references."""


_IgnoreFunctions.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def task_names() -> list[str]:
    """The downstream tasks this repository defines (``harness/downstream/tasks/*.yaml``)."""
    return sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))


def task_info(name: str) -> dict[str, Any]:
    """A task's harness metadata: ``metric`` (lm-eval result key), ``chance`` level and ``output_type``."""
    path = TASKS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise UnknownTaskError(f"unknown downstream task {name!r}; available: {', '.join(task_names())}")
    cfg = yaml.load(path.read_text(), Loader=_IgnoreFunctions)
    meta = cfg.get("metadata") or {}
    return {"metric": meta["harness_metric"], "chance": float(meta["chance"]), "output_type": cfg["output_type"]}


def parse_tasks(spec: str | Sequence[str]) -> list[str]:
    """``boolq,piqa`` (or a list) -> checked task names; ``all`` -> every task."""
    items = [t.strip() for t in (spec.split(",") if isinstance(spec, str) else spec) if t.strip()]
    if items == ["all"]:
        return task_names()
    known = set(task_names())
    for t in items:
        if t not in known:
            raise UnknownTaskError(f"unknown downstream task {t!r}; available: {', '.join(task_names())}, or all")
    if not items:
        raise UnknownTaskError("no downstream task given; available: " + ", ".join(task_names()))
    return items


@dataclass(frozen=True)
class TaskScore:
    task: str
    metric: str          # lm-eval result key, e.g. "acc,none"
    value: float
    n: int               # examples scored
    chance: float
    stderr: float | None


def _require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise DownstreamUnavailable("lm-eval is not installed; install the downstream extra: "
                                    "pip install -e '.[downstream]'") from None


class DownstreamEvaluator:
    """Scores the model on downstream tasks; owns the lm-eval model wrapper and the base-model score cache."""

    def __init__(self, lm, *, data_dir: str | None = None, batch_size: int = 16):
        # local files only: the YAMLs build their datasets in memory; nothing may reach a hub (set before
        # `datasets` is first imported, which reads them once)
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        _require_lm_eval()
        self.lm = lm
        self.data_dir = data_dir
        self.batch_size = batch_size
        self._hflm = None
        self._base: dict[tuple[str, int | None], TaskScore] = {}

    def _model(self):
        if self._hflm is None:
            from lm_eval.models.huggingface import HFLM
            self._hflm = HFLM(pretrained=self.lm.model, tokenizer=self.lm.tokenizer, batch_size=self.batch_size,
                              device=str(self.lm.device))
        return self._hflm

    def evaluate(self, tasks: Sequence[str], limit: int | None) -> dict[str, TaskScore]:
        """Score the model as it is now on ``tasks`` (first ``limit`` examples of each; None: all)."""
        from lm_eval import evaluator
        from lm_eval.tasks import TaskManager

        tasks = parse_tasks(tasks)
        infos = {t: task_info(t) for t in tasks}
        tm = TaskManager(include_path=str(TASKS_DIR), include_defaults=False,
                         metadata={"data_dir": str(self.data_dir) if self.data_dir else None})
        logging.getLogger("lm_eval").setLevel(logging.WARNING)
        res = evaluator.simple_evaluate(model=self._model(), tasks=list(tasks), limit=limit, task_manager=tm,
                                        bootstrap_iters=100, log_samples=False)
        out = {}
        for t in tasks:
            r = res["results"][t]
            key = infos[t]["metric"]
            metric, _, filt = key.partition(",")
            stderr = r.get(f"{metric}_stderr,{filt}")
            out[t] = TaskScore(t, key, float(r[key]), int(res["n-samples"][t]["effective"]), infos[t]["chance"],
                               float(stderr) if isinstance(stderr, (int, float)) else None)
        return out

    def base(self, tasks: Sequence[str], limit: int | None) -> dict[str, TaskScore]:
        """Scores of the unedited model, computed once per (task, limit) for the evaluator's lifetime (the session:
        restores are bit-exact). Call only while the model is unedited."""
        tasks = parse_tasks(tasks)
        missing = [t for t in tasks if (t, limit) not in self._base]
        if missing:
            for t, s in self.evaluate(missing, limit).items():
                self._base[(t, limit)] = s
        return {t: self._base[(t, limit)] for t in tasks}


def downstream_metrics(before: dict[str, TaskScore], after: dict[str, TaskScore]) -> dict[str, float]:
    """Run-JSON names: ``downstream_<task>_before``, ``downstream_<task>_after``, ``downstream_<task>_drop``."""
    out: dict[str, float] = {}
    for t, b in before.items():
        out[f"downstream_{t}_before"] = b.value
        if t in after:
            out[f"downstream_{t}_after"] = after[t].value
            out[f"downstream_{t}_drop"] = b.value - after[t].value
    return out
