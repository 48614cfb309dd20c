"""The metric registry: every metric the harness writes into records is registered (checked against the code that
produces them, on tiny inputs), families resolve, and the one aggregation gives seeded bootstrap intervals that
behave like intervals."""
from __future__ import annotations

import math

import numpy as np
import pytest

from harness.metrics.registry import (
    REGISTRY,
    MetricRegistry,
    MetricSpec,
    aggregate,
    get_metric,
    headline_metrics,
    metric_spec,
    paired_bootstrap,
    summarize,
    to_number,
)


def _produced_names(tiny_llama, builtin_cases) -> set[str]:
    """Metric names as the harness's own code writes them."""
    from harness.downstream.correlation import StateSeries
    from harness.downstream.evaluator import TaskScore, downstream_metrics
    from harness.locality import PROTOCOLS as LOCALITY
    from harness.metrics.counterfact import PROTOCOLS as CF
    from harness.metrics.counterfact import counterfact_metrics
    from harness.problems import ProblemProbs, problem_scores
    from harness.sequential import SequentialResult
    from harness.tracing import TraceResult, localization_r2

    names = set(CF) | set(LOCALITY)
    cf = counterfact_metrics(tiny_llama.model, tiny_llama.tokenizer, builtin_cases[0])
    names |= set(cf) | {f"{k}_pre" for k in cf}
    names |= {"ppl_before", "ppl_after", "ppl_ratio", "ppl_token_before", "ppl_token_after"}   # session.single_edit
    names |= {"kl_unrelated", "top1_changed", "drift_positions", "neighborhood_retained", "qa_locality",
              "qa_locality_acc", "qa_locality_acc_pre"}                                       # locality_edit
    seq = SequentialResult(steps=[{"n_edits": 1, "ppl": 20.0, "efficacy": [1.0],
                                   "norms": {"w": {"l1": 0.1, "delta_l1": 0.0, "delta_fro": 1.0}}}], ppl_base=19.0,
                           final={"c": {"efficacy_success": 1.0, "paraphrase_success": 1.0, "neighborhood_success": 1.0}})
    names |= set(seq.metrics(2.0))
    score = TaskScore("piqa", "acc,none", 0.7, 20, 0.5, 0.1)
    names |= set(downstream_metrics({"piqa": score}, {"piqa": score}))
    series = StateSeries()
    for n, ppl, acc in ((0, 20.0, 0.7), (1, 40.0, 0.6), (2, 80.0, 0.5)):
        series.add(n, ppl, {"piqa": acc})
    names |= set(series.correlations()) | {"downstream_series", "n_edits", "ppl_curve"}
    trace = TraceResult("p", "s", "a", "a", (0, 1), 0.5, 0.1, {"hidden": [0.1, 0.2], "mlp": [0.0, 0.3]})
    names |= set(trace.metrics())
    names |= set(localization_r2([0, 1, 0, 1], [0.1, 0.2, 0.3, 0.1], [0.5, 0.9, 0.4, 0.8]))
    names |= {"layers", "window", "tracing_effect", "edit_success", "efficacy_by_layer", "tracing_effect_by_kind",
              "tracing_effect_per_fact", "edit_success_per_fact", "r2_tracing_mlp", "best_layer",
              "best_edit_success", "peak_tracing_layer"}                                       # LayerSweep.metrics
    names |= set(problem_scores(ProblemProbs([0.1], [0.2], [0.3]), ProblemProbs([0.9], [0.8], [0.3]), erase=False))
    return names


def test_every_metric_the_harness_records_is_registered(tiny_llama, builtin_cases):
    names = _produced_names(tiny_llama, builtin_cases)
    assert len(names) > 60
    missing = sorted(n for n in names if get_metric(n) is None)
    assert not missing, f"metrics written into records but not in harness/metrics/registry.py: {missing}"


def test_families_and_unknown_names():
    after = metric_spec("downstream_hellaswag_after")
    assert after.registered and after.higher_is_better is True and after.label == "hellaswag after"
    assert metric_spec("downstream_hellaswag_drop").higher_is_better is False
    assert metric_spec("ppl_downstream_spearman_piqa").higher_is_better is None
    pre = metric_spec("efficacy_success_pre")          # the unedited model's value: shown, no direction
    assert pre.higher_is_better is None and pre.label == "ES before" and not pre.headline
    assert get_metric("qa_locality_acc_pre").label == "QA acc before"     # an exact name beats the family
    assert get_metric("no_such_metric_pre") is None
    unknown = metric_spec("my_plugin_metric")
    assert not unknown.registered and unknown.higher_is_better is None and unknown.aggregation == "mean"
    assert metric_spec("timings.edit").aggregation == "median" and metric_spec("timings.edit").relative
    assert metric_spec("edits_to_collapse").aggregation == "min"
    assert "higher is better" in metric_spec("efficacy_success").tooltip
    assert headline_metrics(["ppl_ratio", "foo", "efficacy_success", "ppl_before"]) == ["efficacy_success", "ppl_ratio"]


def test_registry_rejects_duplicates_and_bad_aggregations():
    reg = MetricRegistry()
    reg.register(MetricSpec("x", "", True))
    with pytest.raises(ValueError, match="already registered"):
        reg.register(MetricSpec("x", "", True))
    with pytest.raises(ValueError, match="aggregation 'sum'"):
        MetricSpec("y", "", True, "sum")
    reg.register(MetricSpec("acc_{task}", "", True, label="{task}!"))
    assert reg.get("acc_boolq").label == "boolq!" and reg.order("acc_boolq") == (1, "acc_boolq")
    assert reg.order("zzz") == (2, "zzz")


def test_to_number():
    assert [to_number(v) for v in (1, 0.5, True, "inf", "-inf", None, float("nan"), "x", [1])] == \
        [1.0, 0.5, 1.0, math.inf, -math.inf, None, None, None, None]


def test_aggregate_is_seeded_and_its_interval_behaves():
    rng = np.random.default_rng(1)
    values = list(rng.normal(0.7, 0.2, size=400))
    a, b = aggregate(values), aggregate(list(values))
    assert a == b                                             # same inputs, same numbers: reruns print the same
    assert a.n == 400 and a.low < a.value < a.high
    half = 1.96 * np.std(values, ddof=1) / math.sqrt(400)     # the normal-theory interval for comparison
    assert (a.high - a.low) / 2 == pytest.approx(half, rel=0.15)
    wide = aggregate(values[:25])
    assert wide.high - wide.low > 2.5 * (a.high - a.low)      # fewer cases, wider interval
    assert aggregate([0.5, None, "x", 1.5]).n == 2            # non-numbers leave n
    one = aggregate([0.3])
    assert (one.value, one.low, one.high, one.n) == (0.3, 0.3, 0.3, 1)
    assert aggregate([]).value is None and aggregate([]).n == 0
    assert aggregate([1.0, "inf"]).value == math.inf          # a collapsed case is not dropped
    med = aggregate([1.0, 2.0, 100.0], "median")
    assert med.value == 2.0 and med.aggregation == "median"
    assert aggregate([30, None, 12], "min").value == 12 and aggregate([None], "min").value == math.inf


def test_paired_bootstrap_detects_a_shift_and_not_noise():
    rng = np.random.default_rng(2)
    base = rng.uniform(0.5, 1.0, size=40)
    shifted = paired_bootstrap(base, base - 0.1)
    assert shifted.change == pytest.approx(-0.1) and shifted.high < 0
    noise = paired_bootstrap(base, base + rng.normal(0, 0.05, size=40))
    assert noise.low < 0 < noise.high
    rel = paired_bootstrap([2.0, 2.0, 2.0], [3.0, 3.0, 3.0], "median", relative=True)
    assert rel.change == pytest.approx(0.5) and rel.low == rel.high == pytest.approx(0.5)
    with pytest.raises(ValueError):
        paired_bootstrap([1.0], [1.0, 2.0])


def test_summarize_groups_by_suite_and_editor():
    recs = [{"suite": "s", "editor": "e", "outcome": "passed", "metrics": {"efficacy_success": 1.0,
                                                                           "ppl_curve": [[0, 1.0]]},
             "timings": {"edit": 2.0}},
            {"suite": "s", "editor": "e", "outcome": "failed", "metrics": {"efficacy_success": 0.0},
             "timings": {"edit": 4.0}},
            {"suite": "s", "editor": "e", "outcome": "skipped", "metrics": {}},
            {"suite": "t", "editor": "e", "outcome": "passed", "metrics": {"edits_to_collapse": None}}]
    groups = summarize(recs)
    assert [(g.suite, g.editor, g.n, g.passed, g.failed, g.skipped) for g in groups] == [
        ("s", "e", 3, 1, 1, 1), ("t", "e", 1, 1, 0, 0)]
    s = groups[0].metrics
    assert set(s) == {"efficacy_success", "timings.edit"}     # series are per record only
    assert s["efficacy_success"].value == 0.5 and s["timings.edit"].value == 3.0
    assert groups[1].metrics["edits_to_collapse"].value == math.inf
    assert groups[0].to_json()["metrics"]["efficacy_success"]["ci_low"] == 0.0


def test_registry_is_the_only_source_of_directions():
    directional = [n for n in REGISTRY.names() if "{" not in n and get_metric(n).higher_is_better is not None]
    assert {"efficacy_success", "ppl_ratio", "kl_unrelated", "edits_to_collapse"} <= set(directional)
    assert get_metric("ppl_before").higher_is_better is None
