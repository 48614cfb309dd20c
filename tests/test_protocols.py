"""Each protocol in-process on the tiny model (no pytester): what it measures equals the same measurement done by
hand with the edit lifecycle, and the model is bit-identical afterwards."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from harness import protocols
from harness.editing import RestoreError, edited
from harness.locality import neighbour_wins, retained
from harness.metrics import counterfact_metrics
from harness.models import param_digest
from harness.problems import run_problem
from harness.session import HarnessSession
from harness.timing import PhaseTimer

from .test_session import tiny_options

DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture(scope="module")
def h(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("protocols")
    return HarnessSession(tiny_options(tiny_model_dir, tmp, sweep_layers="0,2", trace_samples=2, trace_window=2,
                                       data_dir=str(DATA), downstream_tasks=["boolq"], downstream_limit=None))


def _digest(h):
    return param_digest(h.lm.model)


def test_single_edit_equals_the_edit_done_by_hand(h):
    case, rome = h.cases()[0], h.editor("rome")
    before = _digest(h)
    timer = PhaseTimer()
    m = protocols.single_edit(h, rome, case, timer)
    assert _digest(h) == before
    assert {"edit", "evaluate", "perplexity", "restore"} <= set(timer.seconds)
    pre = counterfact_metrics(h.lm.model, h.lm.tokenizer, case)
    with edited(h.lm, rome, [case]):
        post = counterfact_metrics(h.lm.model, h.lm.tokenizer, case)
        ppl = h.perplexity().mean_ppl
    assert {k: m.metrics[f"{k}_pre"] for k in pre} == pre
    assert {k: m.metrics[k] for k in post} == post
    assert m.metrics["ppl_before"] == h.base_perplexity().mean_ppl and m.metrics["ppl_after"] == ppl
    assert m.metrics["ppl_ratio"] == pytest.approx(ppl / h.base_perplexity().mean_ppl)
    assert set(m.protocols) == set(m.metrics)                 # every metric says how it was measured


def test_edit_lifecycle_detects_an_inexact_restore(h):
    case, ft = h.cases()[0], h.editor("ft")
    names = ft.edited_parameters(h.lm)
    from harness.models import WeightSnapshot
    snap = WeightSnapshot(h.lm.model, names)
    with pytest.raises(RestoreError, match="restore after ft_l was not bit-exact"):
        with edited(h.lm, ft, [case]) as edit:
            edit.restore = lambda: None                        # a restore that forgets to undo
    snap.restore()
    with edited(h.lm, ft, [case]):
        pass                                                   # a normal edit restores exactly (no error)


def test_sequential_stream_is_restored(h):
    rome, cases = h.editor("rome"), h.cases()
    before = _digest(h)
    m = protocols.sequential(h, rome, cases, PhaseTimer())
    assert _digest(h) == before
    assert m.metrics["n_edits"] == 2 and [n for n, _ in m.metrics["ppl_curve"]] == [0, 1, 2]
    assert m.metrics["ppl_curve"][0][1] == h.base_perplexity().mean_ppl
    assert m.metrics["ppl_ratio"] == pytest.approx(m.metrics["ppl_curve"][-1][1] / m.metrics["ppl_curve"][0][1])
    stream = m.info.pop("stream_cases")
    assert m.info == {"resumed_from": 0, "resumed_edits": 0, "batch_size": 1, "ppl_schedule": "every"}
    assert stream["n"] == 2 and len(stream["content_sha256"]) == 64
    assert any((Path(h.options.report_dir) / "sequential").glob("rome-*.jsonl"))
    # the first edit's immediate efficacy equals a single edit of that case scored by hand
    with edited(h.lm, rome, cases[:1]):
        first = counterfact_metrics(h.lm.model, h.lm.tokenizer, cases[0])["efficacy_success"]
    assert m.metrics["efficacy_immediate"] in ((first + e) / 2 for e in (0.0, 1.0))


def test_locality_equals_the_comparison_done_by_hand(h):
    case, rome = h.cases()[1], h.editor("rome")
    m = protocols.locality(h, rome, case, PhaseTimer())
    wins_pre = neighbour_wins(h.lm.model, h.lm.tokenizer, case)
    with edited(h.lm, rome, [case]):
        wins_post = neighbour_wins(h.lm.model, h.lm.tokenizer, case)
    assert m.metrics["neighborhood_retained"] == retained(wins_pre, wins_post)
    assert m.metrics["kl_unrelated"] > 0 and 0 <= m.metrics["top1_changed"] <= 1
    assert m.metrics["drift_positions"] == h.drift_reference().n_positions
    assert "builtin" in m.protocols["drift_positions"]


def test_editing_problem_equals_run_problem(h):
    case, ft = h.cases()[0], h.editor("ft")
    m = protocols.editing_problem(h, ft, case, "fact_amplification", PhaseTimer())
    metrics, info = run_problem(h.lm, case, "fact_amplification", h.tracer, lambda r: edited(h.lm, ft, [r]))
    assert m.metrics == metrics and m.info == info and info["objective"] == "amplify"
    assert set(m.protocols) == set(m.metrics)


def test_causal_trace_and_its_verdicts(h, tiny_tokenizer):
    from harness.data.known_facts import KnownFact
    fact = KnownFact(case_id="t0", subject="Toronto", attribute="Canada", prompt="Toronto is located in the country of",
                     source="test")
    m = protocols.causal_trace(h, fact, PhaseTimer())
    again = h.tracer.trace(fact.prompt, fact.subject, fact.attribute).metrics()
    assert m.metrics == again                                  # the tracer's draws are seeded
    assert set(m.metrics["tracing_effect"]) == {"hidden", "mlp", "attn"}
    drop = m.metrics["corruption_drop"] / m.metrics["p_clean"]
    reason = h.thresholds.untraceable(m)
    assert (reason is None) == (drop >= h.thresholds.min_trace_drop)


def test_layer_sweep_and_what_cannot_be_swept(h, monkeypatch):
    assert "a window of 3 layers needs" in protocols.sweep_unsupported(h, "rome", 3)
    assert protocols.sweep_unsupported(h, "rome", 1) is None and protocols.sweep_unsupported(h, "ft", 3) is None
    monkeypatch.setattr(h, "known_cases", lambda limit: h.cases()[:1])      # the random model knows no fact
    before = _digest(h)
    m = protocols.layer_sweep(h, "rome", 1, PhaseTimer())
    assert _digest(h) == before
    assert m.metrics["layers"] == [0, 2] and len(m.metrics["edit_success"]) == 2
    assert m.info["editor"] == "rome" and m.info["facts"] == [h.cases()[0].case_id]


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm-eval is not installed")
def test_downstream_edit_and_correlation(h):
    rome = h.editor("rome")
    case = h.cases()[0]
    m = protocols.downstream_edit(h, rome, case, PhaseTimer())
    before = h.downstream.base(["boolq"], None)["boolq"].value
    with edited(h.lm, rome, [case]):
        after = h.downstream.evaluate(["boolq"], None)["boolq"].value
    assert m.metrics == {"downstream_boolq_before": before, "downstream_boolq_after": after,
                         "downstream_boolq_drop": before - after}
    assert m.info["edited_case"] == case.case_id and m.info["examples"] == {"boolq": 4}
    c = protocols.correlation(h, rome, h.cases(), PhaseTimer())
    assert [row["n_edits"] for row in c.metrics["downstream_series"]] == [0, 1, 2]
    assert c.metrics["downstream_boolq_before"] == before and c.metrics["n_edits"] == 2
