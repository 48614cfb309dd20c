"""Issue 28, verdicts that can fail: every registered metric has a direction or says why it has none; a library
caller of ``harness.report.compare`` gets the built-in specs (and their directions) without registering them; the
tracing suite and the diversity summary check their results, not only their configuration."""
from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from harness.metrics.registry import REGISTRY, MetricRegistry, MetricSpec
from harness.protocols.base import Measurement
from harness.specs import builtin_specs
from harness.thresholds import TRACE_RESTORED_TOLERANCE, Thresholds

ROOT = Path(__file__).resolve().parents[1]


def test_every_registered_metric_has_a_direction_or_says_why():
    specs = REGISTRY.specs()
    names = {s.name for s in specs}
    assert {"efficacy_success", "ppl_before", "norm_efficacy_spearman", "downstream_task_after",
            "timings.phase"} <= names
    assert {s["name"].replace("{group}", "group") for s in builtin_specs()} <= names    # built-ins are in
    undirected = [s.name for s in specs if s.higher_is_better not in (True, False) and not s.why_no_direction.strip()]
    assert undirected == []
    assert REGISTRY.get("efficacy_success_pre").why_no_direction           # the {base}_pre family too
    assert REGISTRY.spec("no_such_metric").why_no_direction                   # shown, never compared: says so
    assert "no direction (" in REGISTRY.get("ppl_before").tooltip


def test_the_registry_refuses_a_metric_without_direction_or_reason():
    reg = MetricRegistry()
    with pytest.raises(ValueError, match="'shrug' has no direction: give higher_is_better"):
        reg.register(MetricSpec("shrug", "", None))
    reg.register(MetricSpec("shrug", "", None, why_no_direction="a count of the run"))


COMPARE = """
import json, sys
from harness.report.compare import compare
baseline, run = (json.load(open(p)) for p in sys.argv[1:3])
result = compare(baseline, run)
assert result.refused is None, result.refused
print(json.dumps(sorted({(r.metric, r.status) for r in result.rows if r.metric.startswith("wild_")})))
"""


def test_a_library_caller_of_compare_gets_the_builtin_directions(tmp_path):
    """In a fresh interpreter, without register_builtin_specs(): before, ``wild_rewrite_contains`` (a spec owned by
    its protocol) was unregistered there, so a drop from 1 to 0 was shown but never a regression."""
    from .test_report import make_run

    base = make_run()
    for r in base["records"]:
        if r["suite"] == "single_edit" and r["metrics"]:
            r["metrics"]["wild_rewrite_contains"] = 1.0
    run = copy.deepcopy(base)
    for r in run["records"]:
        if "wild_rewrite_contains" in r["metrics"]:
            r["metrics"]["wild_rewrite_contains"] = 0.0
    paths = [tmp_path / "b.json", tmp_path / "r.json"]
    for p, data in zip(paths, (base, run)):
        p.write_text(json.dumps(data))
    out = subprocess.run([sys.executable, "-c", COMPARE, *map(str, paths)], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin",
                                                      "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    assert rows and all(status == "regressed" for metric, status in rows), rows


# ------------------------------------------------------------------------------------------------ tracing
def _trace(p_clean=0.8, p_corrupted=0.1, hidden=(0.0, 0.3, 0.6), mlp=(0.0, 0.1, 0.05)) -> Measurement:
    return Measurement({"p_clean": p_clean, "p_corrupted": p_corrupted, "corruption_drop": p_clean - p_corrupted,
                        "tracing_effect": {"hidden": list(hidden), "mlp": list(mlp)}})


def test_tracing_results_are_checked():
    t = Thresholds()
    assert t.violations_tracing_results(_trace()) == []
    over = _trace(hidden=(0.0, 0.3, 0.7 + TRACE_RESTORED_TOLERANCE + 0.01))            # restored P above clean
    (msg,) = t.violations_tracing_results(over)
    assert msg.startswith("hidden tracing effect at layer 2: restored P=0.910 is not between P noised 0.100")
    assert t.violations_tracing_results(_trace(mlp=(0.0, math.nan, 0.0)))[0].startswith("mlp tracing effect at layer 1")
    assert t.violations_tracing_results(_trace(p_clean=1.5)) == ["p_clean=1.500 is not a probability"]
    # the configuration-level check alone passes all of these (effects within [-1, 1], one positive)
    assert t.violations_tracing(over) == []


# ------------------------------------------------------------------------------------------------ diversity
def _summary(lengths=(4, 4, 4), rho=0.5, stream_rho=-0.9) -> Measurement:
    table = [{"set": s, "n_edits": n, "target_entropy": h, "norm_efficacy_spearman": stream_rho,
              "norm_efficacy_pearson": None} for s, n, h in zip(("yesno", "few", "distinct"), lengths, (1.0, 2.0, 3.5))]
    return Measurement({"n_sets": 3, "diversity_table": table, "diversity_ppl_ratio_spearman": rho,
                        "diversity_ppl_ratio_pearson": None})


def test_diversity_summary_results_are_checked():
    t = Thresholds()
    assert t.violations_diversity_results(_summary(), 4) == []
    assert t.violations_diversity_results(_summary(lengths=(4, 3, 4)), 4) == [
        "streams of other lengths than --seq-edits 4 (few: 3 edits)"]
    assert t.violations_diversity_results(_summary(rho=math.nan), 4) == [
        "diversity_ppl_ratio_spearman=nan is not a correlation in [-1, 1] (nor undefined)"]
    assert t.violations_diversity_results(_summary(stream_rho=1.2), 4)[0].startswith(
        "yesno.norm_efficacy_spearman=1.200")
    # the configuration-level check alone passes all of these
    assert t.violations_diversity_summary(_summary(lengths=(4, 3, 4), rho=math.nan)) == []


def test_diversity_summary_table_carries_the_stream_lengths():
    from harness.protocols.diversity import diversity_summary

    def stream(kind: str, h: float) -> Measurement:
        return Measurement({"n_edits": 4, "target_entropy": h, "ppl_ratio": 1.0 + h / 10, "efficacy_final": 0.5,
                            "efficacy_immediate": 0.9, "efficacy_decline": 0.4, "norm_growth": 1.1,
                            "target_nll": 3.0, "norm_efficacy_spearman": -0.5, "norm_efficacy_pearson": -0.4},
                           info={"diversity_set": kind})
    m = diversity_summary([stream("yesno", 1.0), stream("few", 2.0), stream("distinct", 3.0)])
    assert [row["n_edits"] for row in m.metrics["diversity_table"]] == [4, 4, 4]
    assert Thresholds().violations_diversity_results(m, 4) == []
