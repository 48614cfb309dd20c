"""Causal tracing, the known-facts loader and the R^2 comparison, on tiny random models (seconds)."""
from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
import torch

from harness.data import DataError
from harness.data.known_facts import load_known_facts
from harness.tracing import (
    CausalTracer,
    localization_r2,
    parse_layers,
    r_squared,
    subject_token_range,
    window_layers,
)

PROMPT, SUBJECT = "Toronto is located in the country of", "Toronto"


def _clean_prob(lm, prompt, answer_id):
    ids = torch.tensor([lm.tokenizer(prompt).input_ids])
    with torch.no_grad():
        return float(torch.softmax(lm.model(input_ids=ids).logits[0, -1].float(), -1)[answer_id])


def test_trace_shapes_and_clean_probability(tiny_lm):
    tracer = CausalTracer(tiny_lm, samples=3, window=2)
    r = tracer.trace(PROMPT, SUBJECT)                      # the model's own top answer
    n = tiny_lm.n_layers
    assert set(r.effects) == {"hidden", "mlp", "attn"} and all(len(e) == n for e in r.effects.values())
    answer_id = tiny_lm.tokenizer(r.answer_token, add_special_tokens=False).input_ids[0]
    assert r.p_clean == pytest.approx(_clean_prob(tiny_lm, PROMPT, answer_id), rel=1e-5)
    assert r.p_corrupted != pytest.approx(r.p_clean, rel=1e-3)      # the noise changes the prediction


def test_restoring_the_last_state_recovers_the_clean_probability(tiny_lm):
    # the residual stream of the last layer at the last position alone decides the next token: restoring it must
    # give back the clean probability exactly, so the effect there is p_clean - p_corrupted
    tracer = CausalTracer(tiny_lm, samples=4)
    last = len(tiny_lm.tokenizer(PROMPT).input_ids) - 1
    r = tracer.trace(PROMPT, SUBJECT, kinds=("hidden",), token=last)
    assert r.effects["hidden"][-1] == pytest.approx(r.p_clean - r.p_corrupted, abs=1e-6)


def test_zero_noise_gives_zero_effect(tiny_lm):
    r = CausalTracer(tiny_lm, noise=0.0, samples=2, window=3).trace(PROMPT, SUBJECT)
    assert r.p_corrupted == pytest.approx(r.p_clean, abs=1e-6)
    for effects in r.effects.values():
        assert np.allclose(effects, 0.0, atol=1e-6)


def test_same_noise_same_trace(tiny_gpt2):
    a = CausalTracer(tiny_gpt2, samples=3, seed=5).trace(PROMPT, SUBJECT, kinds=("mlp",))
    b = CausalTracer(tiny_gpt2, samples=3, seed=5, max_rows=7).trace(PROMPT, SUBJECT, kinds=("mlp",))  # chunked
    assert np.allclose(a.effects["mlp"], b.effects["mlp"], atol=1e-6)


def test_subject_range_and_windows(tiny_tokenizer):
    b, e = subject_token_range(tiny_tokenizer, "The capital of Canada is", "Canada")
    toks = tiny_tokenizer("The capital of Canada is").input_ids
    assert tiny_tokenizer.decode(toks[b:e]).strip() == "Canada"
    with pytest.raises(ValueError, match="does not occur"):
        subject_token_range(tiny_tokenizer, "The capital of Canada is", "Peru")
    assert window_layers(0, 10, 30) == list(range(5))
    assert window_layers(15, 10, 30) == list(range(10, 20))
    assert window_layers(29, 3, 30) == [28, 29]
    assert window_layers(4, 1, 30) == [4]
    assert parse_layers("every:6", 30) == [0, 6, 12, 18, 24]
    assert parse_layers("3,-1", 30) == [3, 29]
    with pytest.raises(ValueError, match="not in this 30-layer model"):
        parse_layers("31", 30)


def test_r2_on_synthetic_data():
    rng = np.random.default_rng(0)
    layers = np.repeat(np.arange(5), 40)
    success = np.array([0.9, 0.7, 0.5, 0.3, 0.1])[layers] + 0.01 * rng.standard_normal(len(layers))
    noise_effect = rng.random(len(layers))                       # unrelated to success
    r = localization_r2(layers, noise_effect, success)
    assert r["r2_layer"] > 0.99 and r["r2_tracing"] < 0.05 and r["r2_both"] >= r["r2_layer"] - 1e-12
    informative = success + 0.001 * rng.standard_normal(len(layers))   # a tracing effect that does predict
    assert localization_r2(layers, informative, success)["r2_tracing"] > 0.99
    assert np.isnan(r_squared(np.ones(4), np.ones((4, 1))))      # nothing to explain


def test_known_facts_loader(tmp_path, monkeypatch):
    monkeypatch.delenv("HARNESS_DATA_DIR", raising=False)
    facts = load_known_facts("builtin-known")
    assert len(facts) >= 30 and all(f.subject in f.prompt for f in facts)
    bad = tmp_path / "k.json"
    bad.write_text(json.dumps([{"known_id": 7, "subject": "Paris", "prompt": "Rome is in", "attribute": "Italy"}]))
    with pytest.raises(DataError, match=r"k.json record 0 \(known_id 7\): field 'prompt' does not contain"):
        load_known_facts(str(bad))
    bad.write_text(json.dumps([{"known_id": 1, "subject": "Paris", "prompt": "Paris is in"}]))
    with pytest.raises(DataError, match="field 'attribute' is missing"):
        load_known_facts(str(bad))
    with pytest.raises(DataError, match="need a data dir"):
        load_known_facts("known", data_dir=None)


@pytest.mark.slow
def test_embedded_model_tracing_and_erasure():
    """On SmolLM2-135M: the shipped known facts are known, tracing localizes a fact at the subject's last token in the
    lower half of the network, and FT-L's erase objective removes most of a known answer's probability."""
    from harness.data import load_cases
    from harness.editors import build_editor
    from harness.models import load_model
    from harness.problems import known_cases, problem_case, run_problem, top1_matches

    lm = load_model("smollm2-135m", device="cpu")
    facts = load_known_facts("builtin-known")
    assert all(top1_matches(lm, [f.prompt for f in facts], [f.attribute for f in facts]))
    tracer = CausalTracer(lm, samples=3)
    r = tracer.trace("The mother tongue of Vladimir Putin is", "Vladimir Putin", "Russian", kinds=("hidden",))
    assert r.p_clean > 0.5 and r.p_corrupted < 0.1 * r.p_clean
    assert r.peak_layer("hidden") < lm.n_layers // 2 and max(r.effects["hidden"][-5:]) < 0.05
    case = known_cases(lm, load_cases("builtin"), limit=1)[0]
    ft = build_editor("ft", lm, ["ft.layers=[4,5,6]"])
    assert problem_case(case, "fact_erasure", tracer).objective == "erase"

    @contextlib.contextmanager
    def edited(request):
        edit = ft.apply(lm, [request])
        try:
            yield edit
        finally:
            edit.restore()
    metrics, info = run_problem(lm, case, "fact_erasure", tracer, edited)
    assert info["problem"] == "fact_erasure" and metrics["rewrite_score"] > 0.5, metrics
