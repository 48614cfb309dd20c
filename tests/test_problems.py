"""The editing problems' objectives and scores, and the layer sweep, on tiny random models (seconds)."""
from __future__ import annotations

import contextlib

import pytest
import torch

from harness.editors import build_editor
from harness.editors.common import (
    ValueOpt,
    objective_loss,
    optimize_value,
    subject_first_index,
    subject_last_index,
)
from harness.problems import (
    PROBLEMS,
    LayerSweep,
    ProblemProbs,
    change_score,
    neighborhood_score,
    place_editor,
    problem_case,
    problem_probs,
    problem_scores,
    run_problem,
    target_probs,
)
from harness.tracing import CausalTracer

from .conftest import TINY_HPARAMS, make_stats


def _editor(name, lm, extra=()):
    return build_editor(name, lm, TINY_HPARAMS[name] + list(extra), stats=make_stats(lm))


@contextlib.contextmanager
def _edited(editor, lm, case):
    edit = editor.apply(lm, [case])
    try:
        yield edit
    finally:
        edit.restore()


def test_objective_loss():
    nll = torch.tensor([0.1, 2.0])
    assert objective_loss(nll, "rewrite") == objective_loss(nll, "amplify") == nll.mean()
    p = torch.exp(-nll)
    assert torch.allclose(objective_loss(nll, "erase"), -torch.log(1 - p).mean())
    with pytest.raises(ValueError, match="unknown edit objective 'flip'"):
        objective_loss(nll, "flip")


def test_case_objective_validation(builtin_cases):
    c = builtin_cases[0]
    assert c.objective == "rewrite" and c.with_objective("erase").objective == "erase"
    with pytest.raises(ValueError, match="unknown objective"):
        c.with_objective("flip")
    with pytest.raises(ValueError, match="needs noise_std > 0"):
        c.with_objective("force")


def test_subject_token_indices(tiny_tokenizer):
    tok = tiny_tokenizer
    for template, subject in [("The capital of {} is", "Canada"), ("{} is located in", "Rio de Janeiro")]:
        ids = tok(template.format(subject)).input_ids
        first, last = subject_first_index(tok, template, subject), subject_last_index(tok, template, subject)
        assert tok.decode(ids[first:last + 1]).strip() == subject


def test_scores():
    assert change_score(0.2, 0.6, erase=False) == pytest.approx(0.5)      # half of the missing 0.8 recovered
    assert change_score(0.4, 0.1, erase=True) == pytest.approx(0.75)      # three quarters erased
    assert change_score(0.4, 0.5, erase=True) == 0.0                      # never negative
    assert neighborhood_score(0.3, 0.3) == 1.0 and neighborhood_score(0.9, 0.45) == pytest.approx(0.5)
    s = problem_scores(ProblemProbs([0.2], [0.2, 0.4], [0.5]), ProblemProbs([0.6], [0.6, 0.7], [0.5]), erase=False)
    assert s["rewrite_score"] == pytest.approx(0.5) and s["neighborhood_score"] == 1.0
    assert s["problem_score"] == pytest.approx(3 / (1 / 0.5 + 1 / s["paraphrase_score"] + 1))


def test_erase_lowers_and_amplify_raises_the_true_answer(tiny_lm, builtin_cases):
    # a tiny random model spreads its probability nearly uniformly (P ~ 1e-3), so the checks are relative
    case = builtin_cases[0]
    tracer = CausalTracer(tiny_lm, samples=2)
    amplify, erase = problem_case(case, "fact_amplification", tracer), problem_case(case, "fact_erasure", tracer)
    assert amplify.target_new == erase.target_new == case.target_true
    assert (amplify.objective, erase.objective) == ("amplify", "erase")
    p0 = target_probs(tiny_lm, [case.rewrite_prompt], case.target_true)[0]
    ft = ["lr=0.05", "norm_constraint=0.05", "early_stop_loss=0", "num_steps=10"]
    for editor, request, lower in ((_editor("ft", tiny_lm, ft), erase, True), (_editor("ft", tiny_lm, ft), amplify, False)):
        with _edited(editor, tiny_lm, request):
            p1 = target_probs(tiny_lm, [case.rewrite_prompt], case.target_true)[0]
        assert (p1 < 0.9 * p0) if lower else (p1 > 1.05 * p0), (editor.name, request.objective, p0, p1)


def test_erase_pushes_v_star_against_rewrite(tiny_llama, builtin_cases):
    # ROME/MEMIT's v*: the erase term -log(1 - p) and the rewrite term -log p have opposite gradients in delta, so
    # one Adam step (a signed step) moves v* the opposite way
    rome = _editor("rome", tiny_llama)
    case = builtin_cases[0]
    templates = rome.context_templates(tiny_llama)
    opt = ValueOpt(steps=2, lr=0.05, kl_factor=0.0, weight_decay=0.0, early_stop_loss=0.0)
    module = tiny_llama.adapter.mlp_name(1)
    v_erase, v0, info = optimize_value(tiny_llama, case.with_objective("erase"), module, templates, opt)
    v_rewrite, v0b, info_rw = optimize_value(tiny_llama, case, module, templates, opt)
    assert info["objective"] == "erase" and "objective" not in info_rw and torch.equal(v0, v0b)
    cos = torch.nn.functional.cosine_similarity(v_erase - v0, v_rewrite - v0, dim=0)
    assert cos < -0.9


def test_force_raises_the_true_answer_under_subject_noise(tiny_llama, builtin_cases):
    case = builtin_cases[1]
    tracer = CausalTracer(tiny_llama, samples=3)
    request = problem_case(case, "fact_forcing", tracer)
    assert request.objective == "force" and request.noise_std == pytest.approx(3 * tracer.sigma)
    pre = problem_probs(tiny_llama, request, tracer)
    ft = _editor("ft", tiny_llama, ["lr=0.05", "norm_constraint=0.05", "early_stop_loss=0", "num_steps=10"])
    with _edited(ft, tiny_llama, request):
        post = problem_probs(tiny_llama, request, tracer)
    assert post.rewrite[0] > 1.05 * pre.rewrite[0]
    # scoring under noise differs from clean scoring of the same prompt
    assert target_probs(tiny_llama, [case.rewrite_prompt], case.target_true)[0] != pytest.approx(pre.rewrite[0])


def test_ft_window_tunes_every_layer(tiny_llama, builtin_cases):
    ft = _editor("ft", tiny_llama, ["layers=[1,2]", "lr=0.01", "norm_constraint=0.01"])
    assert ft.edited_parameters(tiny_llama) == [tiny_llama.adapter.weight_name(1), tiny_llama.adapter.weight_name(2)]
    w = [tiny_llama.adapter.mlp_weight(tiny_llama.model, i).detach().clone() for i in (1, 2, 3)]
    with _edited(ft, tiny_llama, builtin_cases[0]):
        changed = [not torch.equal(x, tiny_llama.adapter.mlp_weight(tiny_llama.model, i)) for x, i in zip(w, (1, 2, 3))]
    assert changed == [True, True, False]


def test_problem_cases_and_run(tiny_gpt2, builtin_cases):
    case = builtin_cases[0]
    tracer = CausalTracer(tiny_gpt2, samples=2)
    reversal = problem_case(case, "tracing_reversal", tracer)
    assert reversal.target_new not in ("", case.target_true) and reversal.objective == "rewrite"
    with pytest.raises(ValueError, match="unknown editing problem"):
        problem_case(case, "fact_flipping", tracer)
    editor = _editor("ft", tiny_gpt2, ["lr=0.05", "norm_constraint=0.05", "num_steps=10"])
    metrics, info = run_problem(tiny_gpt2, case, "error_injection", tracer,
                                lambda request: _edited(editor, tiny_gpt2, request))
    assert info["problem"] == "error_injection" and set(PROBLEMS) >= {info["problem"]}
    assert metrics["p_target_post"] > metrics["p_target_pre"] and 0 < metrics["rewrite_score"] <= 1


def test_layer_sweep_records_every_fact_and_layer(tiny_llama, builtin_cases):
    tracer = CausalTracer(tiny_llama, samples=2, window=2)
    rome = _editor("rome", tiny_llama)
    with pytest.raises(ValueError, match="window of 3 layers needs"):
        place_editor(rome, tiny_llama, 1, 3)
    sweep = LayerSweep(tiny_llama, rome, lambda ed, c: _edited(ed, tiny_llama, c),
                       lambda c: tracer.trace(c.rewrite_prompt, c.subject, c.target_true), window=1)
    result = sweep.run(builtin_cases[:2], [0, 2])
    m = result.metrics()
    assert len(m["tracing_effect"]) == len(m["edit_success"]) == 2 and m["n_points"] == 4
    assert set(m["edit_success_per_fact"]) == {c.case_id for c in builtin_cases[:2]}
    assert all(0 <= s <= 1 for row in result.edit_success for s in row)
    assert {"r2_tracing", "r2_layer", "r2_both", "r2_tracing_mlp", "r2_tracing_attn"} <= set(m)
