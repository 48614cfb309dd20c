"""Downstream ability after editing (the collapse papers; AlphaEdit's "general ability"): lm-eval tasks (BoolQ,
PIQA, ARC-Challenge, ... from local files, ``--downstream-tasks``, ``--downstream-limit``) scored on the base model
once per session and after the edit(s); the accuracy drop per task must stay under ``--max-accuracy-drop``.
Then a sequential run over the hard cases: perplexity and accuracy at every state, and their Spearman and Pearson
correlation per task."""
import pytest

from harness.downstream import (
    DownstreamUnavailable,
    accuracy_problems,
    downstream_metrics,
)
from harness.downstream.correlation import downstream_series

pytestmark = pytest.mark.suite("downstream")

PROTOCOL = "lm-eval {metric} on the first {limit} examples, zero-shot, harness/downstream/tasks"


@pytest.fixture(scope="module")
def downstream(harness):
    try:
        return harness.downstream
    except DownstreamUnavailable as e:
        pytest.skip(str(e))


def _protocols(scores, limit):
    return {f"downstream_{t}_{w}": PROTOCOL.format(metric=s.metric, limit=limit or "all")
            for t, s in scores.items() for w in ("before", "after", "drop")}


def test_downstream_single_edit(harness, downstream, editor, record):
    tasks, limit = harness.options.downstream_tasks, harness.options.downstream_limit
    with record.phase("downstream_base"):
        before = downstream.base(tasks, limit)
    case = harness.cases()[0]
    with harness.edited(editor, [case], record.timer), record.phase("downstream"):
        after = downstream.evaluate(tasks, limit)
    record.add(downstream_metrics(before, after), _protocols(before, limit))
    record.note(edited_case=case.case_id, chance={t: s.chance for t, s in before.items()},
                examples={t: s.n for t, s in before.items()})
    problems = accuracy_problems(before, after, harness.thresholds.max_accuracy_drop)
    assert not problems, "; ".join(problems)


def test_ppl_downstream_correlation(harness, downstream, editor, record):
    tasks, limit = harness.options.downstream_tasks, harness.options.downstream_limit
    cases = harness.cases(harness.options.hard_dataset, limit=harness.options.corr_edits)
    series = downstream_series(harness, editor, cases, tasks, limit, record.timer)
    first, last = series.states[0], series.states[-1]
    metrics = {**series.correlations(), "downstream_series": series.to_table(),
               "ppl_curve": [[s["n_edits"], s["ppl"]] for s in series.states], "n_edits": last["n_edits"]}
    for t in tasks:
        metrics[f"downstream_{t}_before"] = first["accuracy"][t]
        metrics[f"downstream_{t}_after"] = last["accuracy"][t]
        metrics[f"downstream_{t}_drop"] = first["accuracy"][t] - last["accuracy"][t]
    record.add(metrics, {**{k: "over the edited states of a sequential run on the hard cases (state 0: base)"
                            for k in metrics if "downstream_" in k and ("spearman" in k or "pearson" in k)},
                         "downstream_series": "per state: n_edits, me-ppl, accuracy per task"})
    record.note(hard_dataset=harness.options.hard_dataset, case_ids=[c.case_id for c in cases])
    drops = {t: first["accuracy"][t] - last["accuracy"][t] for t in tasks}
    bad = {t: d for t, d in drops.items() if d > harness.thresholds.max_accuracy_drop}
    assert not bad, "; ".join(f"downstream_{t}: accuracy dropped {d:.3f} after {last['n_edits']} hard edits "
                              f"(> max_accuracy_drop {harness.thresholds.max_accuracy_drop})" for t, d in bad.items())
