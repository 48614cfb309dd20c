"""Target diversity and norm growth (Huang et al., 2024, the D4S paper): one edit set of a diversity family
(:mod:`harness.data.diversity`) as a sequential stream, measured at checkpoints along it: perplexity ratio, the
accuracy of every edit made so far, the edited layers' L1 norm (sum |W|) and mean |W|, downstream accuracy when
asked for. Then the Spearman / Pearson correlation of norm and accuracy along the stream. Accuracy and norms are measured
after every edit (cheap); perplexity and downstream accuracy on the ``--ppl-schedule``.

The stream is :class:`harness.sequential.SequentialRun` (journaled under ``REPORT_DIR/diversity``, one edit per
call, never resumed: every checkpoint must be measured on the live model); its perplexity callback is the probe that
measures a checkpoint. The model is restored after the stream.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data.case import EditCase
from ..editors.base import Editor
from ..metrics.decline import DeclineCurve, DeclinePoint, rewrite_efficacy, target_nll
from ..metrics.norms import total_l1, weight_norms
from ..models.loading import LoadedModel
from ..sequential import SequentialResult, SequentialRun, schedule_points
from ..timing import PhaseTimer

Downstream = Callable[[], dict[str, float]]       # task -> accuracy of the model as it is now


@dataclass
class DeclineStream:
    """What one stream measured: the checkpoints, the journaled steps and the set's targets' NLL before editing."""

    curve: DeclineCurve
    result: SequentialResult
    target_nll: float

    def metrics(self) -> dict[str, Any]:
        immediate = [v for s in self.result.steps for v in s["efficacy"]]
        final = self.result.final.values()
        return {**self.curve.metrics(immediate), "target_nll": self.target_nll,
                "paraphrase_final": _mean(f["paraphrase_success"] for f in final),
                "neighborhood_final": _mean(f["neighborhood_success"] for f in final)}


def _mean(values) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


class _Probe:
    """The perplexity callback of the stream, called after every edit: the accuracy of the edits so far and the
    norms at every edit (cheap), perplexity and downstream accuracy only after the edit counts in ``ppl_points``
    (returns None elsewhere, which the run journals as "not measured")."""

    def __init__(self, lm: LoadedModel, cases: Sequence[EditCase], names: list[str], ppl_points: list[int],
                 perplexity: Callable[[], float], downstream: Downstream | None, timer: PhaseTimer):
        self.lm, self.cases, self.names, self.ppl_points = lm, list(cases), names, set(ppl_points)
        self.ppl, self.downstream, self.timer = perplexity, downstream, timer
        self.curve = DeclineCurve()

    def point(self, n: int, ppl: float | None, measure_downstream: bool) -> DeclinePoint:
        lm = self.lm
        with self.timer.phase("evaluate_curve"):
            eff = rewrite_efficacy(lm.model, lm.tokenizer, self.cases[:n]) if n else []
            norms = weight_norms(lm.model, self.names)
        acc: dict[str, float] = {}
        if self.downstream is not None and measure_downstream:
            with self.timer.phase("downstream"):
                acc = self.downstream()
        return DeclinePoint(n, ppl, sum(eff) / n if n else None, total_l1(norms),
                            {k: v["mean_abs"] for k, v in norms.items()}, acc)

    def __call__(self) -> float | None:
        n = len(self.curve.points)                # the base point is 0, then one call per edit
        if n > len(self.cases):
            raise RuntimeError("the stream measured more checkpoints than it has edits")
        ppl = None
        if n in self.ppl_points:
            with self.timer.phase("perplexity"):
                ppl = self.ppl()
        self.curve.add(self.point(n, ppl, n in self.ppl_points))
        return ppl


def decline_stream(lm: LoadedModel, editor: Editor, cases: Sequence[EditCase], *, perplexity: Callable[[], float],
                   ppl_base: float, journal_dir: Path, timer: PhaseTimer, ppl_schedule: str = "every",
                   downstream: Downstream | None = None, progress: bool = False) -> DeclineStream:
    """``cases`` edited one after another by ``editor``, measured on the unedited model and after every edit;
    ``perplexity`` and ``downstream`` (the model as it is now) only after the edit counts of ``ppl_schedule``.
    ``ppl_base`` is the unedited model's perplexity. The model is restored after the stream (by the run)."""
    names = editor.edited_parameters(lm)
    probe = _Probe(lm, cases, names, schedule_points(len(cases), ppl_schedule), perplexity, downstream, timer)
    with timer.phase("evaluate"):
        nll = target_nll(lm.model, lm.tokenizer, cases)
    probe.curve.add(probe.point(0, ppl_base, True))
    inner = PhaseTimer(lm.device)                 # its "perplexity" phase is the probe, timed on ``timer``
    run = SequentialRun(lm, editor, cases, perplexity=probe, ppl_base=ppl_base, journal_dir=journal_dir,
                        batch_size=1, ppl_schedule="every", resume=False, progress=progress)
    result = run.run(inner)
    for k, v in inner.seconds.items():
        if k != "perplexity":
            timer.seconds[k] = timer.seconds.get(k, 0.0) + v
    if len(probe.curve.points) != len(cases) + 1:
        raise RuntimeError(f"the stream measured {len(probe.curve.points) - 1} of {len(cases)} checkpoints")
    return DeclineStream(probe.curve, result, nll)
