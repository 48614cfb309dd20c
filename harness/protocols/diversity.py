"""Target diversity and norm growth (Huang et al., 2024, the D4S paper): one edit set of a diversity family
(:mod:`harness.data.diversity`) as a sequential stream, measured at checkpoints along it: perplexity ratio, the
accuracy of every edit made so far, the edited layers' L1 norm (sum |W|) and mean |W|, downstream accuracy when
asked for. Then the Spearman / Pearson correlation of norm and accuracy along the stream. Accuracy and norms are
measured after every edit (cheap); perplexity and downstream accuracy on the ``--ppl-schedule``.

The stream is :class:`harness.sequential.SequentialRun` (journaled under ``REPORT_DIR/diversity``, one edit per
call, never resumed: every checkpoint must be measured on the live model); its perplexity callback is the probe that
measures a checkpoint. The model is restored after the stream.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..data.case import EditCase
from ..data.diversity import DiversitySet
from ..editing import guarded
from ..editors.base import Editor
from ..metrics.decline import DeclineCurve, DeclinePoint, diversity_decline, rewrite_efficacy, target_nll
from ..metrics.norms import total_l1, weight_norms
from ..metrics.perplexity import PROTOCOLS as PPL
from ..models.loading import LoadedModel
from ..sequential import SequentialResult, SequentialRun, schedule_points
from ..timing import PhaseTimer
from .base import Measurement

if TYPE_CHECKING:
    from ..session import HarnessSession

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
        return {**self.curve.metrics(immediate), "efficacy_immediate_each": immediate, "target_nll": self.target_nll,
                "paraphrase_final": _mean(f["paraphrase_success"] for f in final),
                "neighborhood_final": _mean(f["neighborhood_success"] for f in final)}


def _mean(values: Iterable[float | None]) -> float | None:
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

    def point(self, n: int, ppl: float | None, downstream: Downstream | None) -> DeclinePoint:
        lm = self.lm
        with self.timer.phase("evaluate_curve"):
            eff = rewrite_efficacy(lm.model, lm.tokenizer, self.cases[:n]) if n else []
            norms = weight_norms(lm.model, self.names)
        acc: dict[str, float] = {}
        if downstream is not None:
            with self.timer.phase("downstream"):
                acc = downstream()
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
        self.curve.add(self.point(n, ppl, self.downstream if n in self.ppl_points else None))
        return ppl


def decline_stream(lm: LoadedModel, editor: Editor, cases: Sequence[EditCase], *, perplexity: Callable[[], float],
                   ppl_base: float, journal_dir: Path, timer: PhaseTimer, ppl_schedule: str = "every",
                   downstream: Downstream | None = None, downstream_base: Downstream | None = None,
                   progress: bool = False) -> DeclineStream:
    """``cases`` edited one after another by ``editor``, measured on the unedited model and after every edit;
    ``perplexity`` and ``downstream`` (the model as it is now) only after the edit counts of ``ppl_schedule``.
    ``ppl_base`` and ``downstream_base`` (default: ``downstream``) measure the unedited model. The model is
    restored after the stream (by the run)."""
    names = editor.edited_parameters(lm)
    probe = _Probe(lm, cases, names, schedule_points(len(cases), ppl_schedule), perplexity, downstream, timer)
    with timer.phase("evaluate"):
        nll = target_nll(lm.model, lm.tokenizer, cases)
    probe.curve.add(probe.point(0, ppl_base, downstream_base or downstream))
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


# --------------------------------------------------------------------------------------------- the protocols

PROTOCOLS = {
    "ppl_ratio_curve": f"{PPL['ppl']}, after / before, on the --ppl-schedule",
    "efficacy_curve": "rome-counterfact efficacy on the rewrite prompts of every edit made so far, after each edit",
    "l1_curve": "sum |W| over the edited weights after each edit (the D4S paper's L1 norm)",
    "mean_abs_curve": "mean |W| of the edited weights after each edit (what the D4S code logs)",
    "efficacy_immediate": "rome-counterfact, each edit right after it was made (mean; _each: per edit)",
    "efficacy_final": "rome-counterfact on the rewrite prompts, every edit after the last one",
    "efficacy_decline": "efficacy_immediate - efficacy_final",
    "norm_growth": "sum |W| over the edited weights after the last edit / before the first",
    "norm_efficacy_spearman": "Spearman of l1 and efficacy-so-far over the edited checkpoints",
    "norm_efficacy_pearson": "Pearson of l1 and efficacy-so-far over the edited checkpoints",
    "target_entropy": "Shannon entropy (bits) of the set's new targets",
    "token_entropy": "Shannon entropy (bits) of all tokens of the set's new targets",
    "target_nll": "mean NLL (nats/token) of the new targets on the rewrite prompts, unedited model",
}


def _downstream(session: HarnessSession) -> tuple[Downstream | None, Downstream | None, str | None]:
    """(after an edit, unedited model, why not) for ``--diversity-downstream``; lm-eval missing: no downstream."""
    o = session.options
    if not o.diversity_downstream:
        return None, None, None
    from ..downstream import DownstreamUnavailable
    try:
        evaluator = session.downstream
    except DownstreamUnavailable as e:
        return None, None, str(e)

    def scores(result: dict) -> dict[str, float]:
        return {t: s.value for t, s in result.items()}
    return (lambda: scores(evaluator.evaluate(o.downstream_tasks, o.downstream_limit)),
            lambda: scores(evaluator.base(o.downstream_tasks, o.downstream_limit)), None)


def diversity(session: HarnessSession, editor: Editor, dset: DiversitySet, timer: PhaseTimer) -> Measurement:
    """One diversity set as a sequential stream (:func:`decline_stream`): the curves, the values after the last
    edit, norm growth, the norm-accuracy correlation, and the set's diversity and target NLL."""
    o, lm = session.options, session.lm
    after, base, why_not = _downstream(session)
    with guarded(lm, editor, f"the {dset.kind} stream of {editor.name}"):
        stream = decline_stream(lm, editor, list(dset.cases), perplexity=lambda: session.perplexity().mean_ppl,
                                ppl_base=session.base_perplexity().mean_ppl,
                                journal_dir=Path(o.report_dir) / "diversity", timer=timer,
                                ppl_schedule=o.ppl_schedule, downstream=after, downstream_base=base,
                                progress=o.progress)
    metrics = {**dset.diversity(lm.tokenizer).to_dict(), **stream.metrics()}
    info = {"diversity_set": dset.kind, "set_description": dset.description, "dataset": session.dataset_name(),
            "case_ids": [c.case_id for c in dset.cases], "ppl_schedule": o.ppl_schedule}
    if why_not:
        info["downstream"] = f"not measured: {why_not}"
    return Measurement(metrics, dict(PROTOCOLS), info)


def diversity_summary(measurements: Sequence[Measurement]) -> Measurement:
    """Across one editor's streams (one per set, the same length): Spearman / Pearson of target entropy against
    each decline measure (:func:`harness.metrics.decline.diversity_decline`), and a row per set."""
    rows = [m.metrics for m in measurements]
    keys = ("n_edits", "target_entropy", "target_nll", "ppl_ratio", "efficacy_immediate", "efficacy_final",
            "efficacy_decline", "norm_growth", "norm_efficacy_spearman", "norm_efficacy_pearson")
    table = [{"set": m.info["diversity_set"], **{k: m.metrics.get(k) for k in keys}} for m in measurements]
    metrics = {**diversity_decline(rows), "diversity_table": table}
    measure = metrics.pop("diversity_measure")
    protocols = {k: f"across the sets of one editor at the same number of edits: {measure} vs the measure"
                 for k in metrics if k.endswith(("_spearman", "_pearson"))}
    return Measurement(metrics, protocols, {"sets": [t["set"] for t in table], "diversity_measure": measure})
