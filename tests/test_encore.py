"""ENCORE: the norm-constrained solve never writes a layer update larger than ||R||_F / (2 sqrt(lambda_n)) whatever
the keys (checked on random problems and on real edits of tiny models), it is MEMIT's solve when lambda_n -> 0, and
most-probable early stopping stops at the first step at which target_new is top-1 in every prompt."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.data.case import EditCase
from harness.editors import build_editor
from harness.editors.common import add_to_subjects, prompts_in_templates, subject_last_index
from harness.editors.memit import hidden_at_subjects
from harness.models import param_digest
from harness.tokens import encode_target

from .conftest import make_stats

HP = ["layers=[1,2]", "v_num_grad_steps=10", "context_template_length_params=[[3,2]]"]


class FixedStats:
    """A LayerStats stand-in with a given second moment."""

    def __init__(self, C: torch.Tensor):
        self.C = C

    def second_moment(self, layer: int) -> torch.Tensor:
        return self.C


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 6), log_lam=st.floats(-3, 4),
       key_scale=st.floats(0.01, 100.0), c_scale=st.floats(0.0, 10.0))
def test_update_norm_respects_its_bound_on_random_problems(tiny_llama, seed, n, log_lam, key_scale, c_scale):
    gen = torch.Generator().manual_seed(seed)
    d_in, d = 12, 7
    A = torch.randn(d_in, d_in, generator=gen, dtype=torch.float64)
    C = c_scale * A @ A.T / d_in                                          # any PSD second moment, even 0
    K = key_scale * torch.randn(d_in, n, generator=gen)
    R = torch.randn(d, n, generator=gen)
    encore = build_editor("encore", tiny_llama, HP + [f"norm_lambda={10 ** log_lam}"])
    encore.stats = FixedStats(C)
    delta = encore.layer_update(tiny_llama, 1, K, R)
    bound = R.double().norm().item() / (2 * math.sqrt(10 ** log_lam))
    assert delta.double().norm().item() <= bound * (1 + 1e-5) + 1e-9
    assert encore._bounds == [pytest.approx(bound)]


def test_norm_lambda_shrinks_the_update_and_vanishes_into_memit(tiny_llama):
    gen = torch.Generator().manual_seed(0)
    C = torch.eye(16, dtype=torch.float64) * 0.01
    K, R = torch.randn(16, 3, generator=gen), torch.randn(8, 3, generator=gen)
    norms = []
    for lam in (1e-8, 1.0, 10.0, 100.0):
        encore = build_editor("encore", tiny_llama, HP + [f"norm_lambda={lam}", "mom2_update_weight=1"])
        encore.stats = FixedStats(C)
        norms.append(encore.layer_update(tiny_llama, 1, K, R).norm().item())
    assert norms == sorted(norms, reverse=True) and norms[-1] < norms[0] / 3
    memit = build_editor("memit", tiny_llama, HP + ["mom2_update_weight=1"])
    memit.stats = FixedStats(C)
    encore = build_editor("encore", tiny_llama, HP + ["norm_lambda=1e-8", "mom2_update_weight=1"])
    encore.stats = FixedStats(C)
    assert torch.allclose(encore.layer_update(tiny_llama, 1, K, R), memit.layer_update(tiny_llama, 1, K, R),
                          rtol=1e-4, atol=1e-6)


def test_real_edits_respect_the_bound_and_restore(tiny_lm, builtin_cases):
    digest = param_digest(tiny_lm.model)
    encore = build_editor("encore", tiny_lm, HP + ["norm_lambda=0.5"], stats=make_stats(tiny_lm))
    edit = encore.apply(tiny_lm, builtin_cases[:2])                       # a batch of two
    try:
        info = edit.info
        assert len(info["update_norms"]) == len(info["update_bounds"]) == 2
        assert all(0 < u <= b * (1 + 1e-5) for u, b in zip(info["update_norms"], info["update_bounds"]))
        deltas = edit.snapshot.deltas()
        assert [round(v.norm().item(), 4) for v in deltas.values()] == [round(u, 4) for u in info["update_norms"]]
    finally:
        edit.restore()
    assert param_digest(tiny_lm.model) == digest


def test_mpes_stops_at_the_most_probable_point(tiny_lm):
    # the subject ends the prompt, so z at the last layer decides the next token directly
    case = EditCase("t", "Toronto", "The best city is {}", "Japan", "Canada")
    assert len(encode_target(tiny_lm.tokenizer, case.target_new)) == 1
    hp = ["layers=[2,3]", "v_num_grad_steps=40", "context_template_length_params=[[3,2]]"]
    encore = build_editor("encore", tiny_lm, hp, stats=make_stats(tiny_lm))
    Z, (info,) = encore.target_values(tiny_lm, [case])
    hits = info["most_probable"]
    assert hits[-1] and not any(hits[:-1]) and len(hits) < 40              # stopped at the first top-1 step
    no_mpes = build_editor("encore", tiny_lm, hp + ["most_probable_stop=false"], stats=make_stats(tiny_lm))
    _, (full,) = no_mpes.target_values(tiny_lm, [case])
    assert full["v_steps"] > info["v_steps"]                               # MEMIT's loop runs on

    # independently: the returned z makes target_new the argmax after every context template
    delta = (Z - hidden_at_subjects(tiny_lm, 3, [case]))[:, 0]            # [d]
    target = encode_target(tiny_lm.tokenizer, case.target_new)[0]
    module = tiny_lm.model.get_submodule(tiny_lm.adapter.layer_name(3))
    for prompt in prompts_in_templates(case, encore.context_templates(tiny_lm)):
        ids = torch.tensor([tiny_lm.tokenizer(prompt.format(case.subject)).input_ids])
        col = subject_last_index(tiny_lm.tokenizer, prompt, case.subject)
        with torch.no_grad(), add_to_subjects(module, delta[None], 1, torch.tensor([0]), torch.tensor([col])):
            logits = tiny_lm.model(input_ids=ids).logits[0, -1]
        assert int(logits.argmax()) == target


def test_encore_state_keeps_the_context_templates(tiny_llama):
    encore = build_editor("encore", tiny_llama, HP, stats=make_stats(tiny_llama))
    templates = encore.context_templates(tiny_llama)
    other = build_editor("encore", tiny_llama, HP, stats=make_stats(tiny_llama))
    other.load_state(encore.state())
    assert other.context_templates(tiny_llama) == templates
