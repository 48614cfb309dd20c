"""Locality metrics on tiny random models: distribution drift against a direct full-logit computation, QA locality,
threshold messages, and the locality suite end to end through the plugin."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from harness.data import load_texts
from harness.locality import (
    DriftReference,
    answer_argmax,
    distribution_drift,
    qa_locality,
)
from harness.metrics import counterfact_metrics
from harness.protocols import Measurement
from harness.thresholds import Thresholds

pytest_plugins = ["pytester"]
SUITES = Path(__file__).resolve().parents[1] / "suites"


@pytest.fixture(scope="module")
def texts():
    return load_texts("builtin-sentences", limit=6)


def _direct_drift(lm, texts, pre_logits):
    """KL(P_pre || P_post) and top-1 changes from full logits of each text alone (no batching, no stored states)."""
    kl, changed, n = 0.0, 0, 0
    for t, lp in zip(texts, pre_logits):
        ids = torch.tensor([lm.tokenizer(t).input_ids])
        lq = F.log_softmax(lm.model(ids).logits[0, :-1].float(), -1)
        kl += float((lp.exp() * (lp - lq)).sum())
        changed += int((lp.argmax(-1) != lq.argmax(-1)).sum())
        n += lp.shape[0]
    return kl / n, changed / n


def _logits(lm, texts):
    with torch.no_grad():
        return [F.log_softmax(lm.model(torch.tensor([lm.tokenizer(t).input_ids])).logits[0, :-1].float(), -1)
                for t in texts]


def test_drift_is_zero_without_an_edit_and_matches_full_logits_after_one(tiny_lm, texts):
    lm = tiny_lm
    ref = DriftReference.build(lm.model, lm.tokenizer, texts)
    same = distribution_drift(lm.model, lm.tokenizer, ref)
    assert same["kl_unrelated"] == pytest.approx(0.0, abs=1e-6) and same["top1_changed"] == 0.0
    assert same["drift_positions"] == ref.n_positions == sum(len(lm.tokenizer(t).input_ids) - 1 for t in texts)

    pre = _logits(lm, texts)
    param = lm.adapter.mlp_weight(lm.model, 1)
    saved = param.detach().clone()
    try:
        with torch.no_grad():
            param.add_(torch.randn_like(param) * 0.5)
        got = distribution_drift(lm.model, lm.tokenizer, ref)
        kl, top1 = _direct_drift(lm, texts, pre)
    finally:
        with torch.no_grad():
            param.copy_(saved)
    assert got["kl_unrelated"] > 1e-4
    assert got["kl_unrelated"] == pytest.approx(kl, rel=1e-3)
    assert got["top1_changed"] == pytest.approx(top1)


def test_drift_refuses_a_changed_output_head(tiny_llama, texts):
    lm = tiny_llama
    ref = DriftReference.build(lm.model, lm.tokenizer, texts[:2])
    head = lm.model.get_output_embeddings().weight
    saved = head.detach().clone()
    try:
        with torch.no_grad():
            head.mul_(1.01)
        with pytest.raises(RuntimeError, match="output head"):
            distribution_drift(lm.model, lm.tokenizer, ref)
    finally:
        with torch.no_grad():
            head.copy_(saved)


def test_qa_locality(tiny_gpt2):
    lm = tiny_gpt2
    pairs = [("nq question: who wrote hamlet", "William Shakespeare"), ("nq question: capital of france", "Paris")]
    pre = answer_argmax(lm.model, lm.tokenizer, pairs)
    assert [len(p[0]) for p in pre] == [len(p[1]) for p in pre]
    m = qa_locality(pre, pre)
    assert m["qa_locality"] == 1.0 and m["qa_locality_acc"] == m["qa_locality_acc_pre"]
    # a made-up "post" whose first answer position is wrong everywhere
    post = [([-1] + a[1:], g) for a, g in pre]
    m = qa_locality(pre, post)
    expected = sum((len(a) - 1) / len(a) for a, _ in pre) / len(pre)
    assert m["qa_locality"] == pytest.approx(expected)


def test_threshold_messages_name_metric_value_and_option():
    t = Thresholds(min_neighborhood=0.5, max_kl=0.01, max_top1_changed=0.02, min_qa_locality=0.9)

    def violations(**metrics):
        return t.violations_locality(Measurement(metrics))
    assert violations(neighborhood_retained=0.8, neighborhood_success=0.1, kl_unrelated=0.001, top1_changed=0.0,
                      qa_locality=1.0) == []
    msgs = violations(neighborhood_retained=0.2, kl_unrelated=0.5, top1_changed=0.1, qa_locality=0.5)
    assert len(msgs) == 4
    assert msgs[0].startswith("neighborhood_retained=0.200 < min_neighborhood 0.5") and "--min-neighborhood" in msgs[0]
    assert "kl_unrelated=0.5 > max_kl 0.01" in msgs[1] and "--max-kl" in msgs[1]
    assert msgs[2].startswith("top1_changed=0.100 > max_top1_changed 0.02") and msgs[3].startswith("qa_locality=0.500")
    assert violations(kl_unrelated=float("inf"))[0].startswith("kl_unrelated=inf")
    assert violations(neighborhood_retained=None) == []       # no neighbour known / zsRE case
    # at the bounds: a bound is inclusive
    assert violations(neighborhood_retained=0.5, kl_unrelated=0.01, top1_changed=0.02, qa_locality=0.9) == []


def test_neighbour_wins_and_retained(tiny_gpt2, builtin_cases):
    from harness.locality import neighbour_wins, retained
    case = builtin_cases[0]
    wins = neighbour_wins(tiny_gpt2.model, tiny_gpt2.tokenizer, case)
    assert len(wins) == len(case.neighborhood_prompts)
    m = counterfact_metrics(tiny_gpt2.model, tiny_gpt2.tokenizer, case)
    assert sum(wins) / len(wins) == pytest.approx(m["neighborhood_success"])   # the same comparison as NS
    assert retained([True, True, False, True], [True, False, True, True]) == pytest.approx(2 / 3)
    assert retained([False, False], [True, True]) is None


def test_locality_suite_records_and_asserts(pytester, tiny_model_dir):
    reports = pytester.path / "reports"
    args = [str(SUITES / "test_locality.py"), "--model", str(tiny_model_dir), "--device", "cpu",
            "--cache-dir", str(pytester.path / "cache"), "--report-dir", str(reports), "--stats-tokens", "2000",
            "--ppl-texts", "8", "--cases", "2", "-p", "no:cacheprovider", "--editor", "rome",
            "--hparam", "rome.layer=1", "--hparam", "v_num_grad_steps=4",
            "--hparam", "context_template_length_params=[[3,2]]"]
    result = pytester.runpytest_subprocess(*args, "--min-neighborhood", "0", "--max-kl", "1e9",
                                           "--max-top1-changed", "1")
    result.assert_outcomes(passed=2)
    run = json.loads((reports / "latest.json").read_text())
    m = run["records"][0]["metrics"]
    assert {"neighborhood_success", "neighborhood_success_pre", "kl_unrelated", "top1_changed"} <= set(m)
    # retained is over the neighbours the unedited model knew: undefined (None) exactly when it knew none
    assert (m["neighborhood_retained"] is None) == (m["neighborhood_success_pre"] == 0)
    assert m["kl_unrelated"] > 0 and 0 <= m["top1_changed"] <= 1
    assert run["config"]["thresholds"]["max_kl"] == 1e9
    # the same run with a KL bound no edit can meet fails, naming the metric and the option
    result = pytester.runpytest_subprocess(*args, "--min-neighborhood", "0", "--max-kl", "0", "--cases", "1")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*kl_unrelated=* > max_kl 0.0*--max-kl*"])
