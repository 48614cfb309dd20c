"""Property tests: every editor's math against its reference (hypothesis).

Closed forms are checked on random small matrices through the pure functions the editors call (``rome_update``,
``memit_update``, ``emmet_update``, ``alphaedit_update``, ``d4s_update``); what needs a model (key averaging, key
statistics, the v* optimisation, the fine-tuning losses, residual spreading, D4S's order independence) on the tiny
random models of ``conftest.py``, against naive ports of the reference code written here.

Profiles: ``fast`` (default, CI) and ``thorough``: ``HYPOTHESIS_PROFILE=thorough pytest tests/test_fidelity.py``.
"""
from __future__ import annotations

import os
import types

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.data import EditCase, load_texts
from harness.editors import build_editor
from harness.editors.alphaedit import alphaedit_update, null_space_projector
from harness.editors.common import ValueOpt, group_mean, optimize_value, subject_last_index
from harness.editors.d4s import d4s_update
from harness.editors.emmet import emmet_update
from harness.editors.memit import memit_update
from harness.editors.rome import rome_update
from harness.stats import LayerStats

settings.register_profile("fast", max_examples=8, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("thorough", max_examples=200, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PROFILE = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "fast"))
# for the tests that run a model: a fifth of the examples
MODEL_PROFILE = settings(PROFILE, max_examples=max(3, PROFILE.max_examples // 5))

seeds = st.integers(0, 2**31 - 1)


def _rng(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _spd(d: int, g: torch.Generator) -> torch.Tensor:
    """A random symmetric positive definite matrix [d, d] with condition number in the hundreds at most."""
    A = torch.randn(d, 3 * d, generator=g, dtype=torch.float64)
    return A @ A.T / (3 * d) + 1e-2 * torch.eye(d, dtype=torch.float64)


def _close(a, b, tol=1e-6):
    a, b = a.double(), b.double()
    return (a - b).norm().item() <= tol * max(1.0, b.norm().item())


# --- closed forms ---------------------------------------------------------------------------------------------
@PROFILE
@given(seed=seeds, d_in=st.integers(2, 24), d_out=st.integers(1, 12), whiten=st.booleans())
def test_rome_maps_k_to_v_star_and_leaves_c_orthogonal_keys_alone(seed, d_in, d_out, whiten):
    g = _rng(seed)
    C = _spd(d_in, g) if whiten else None
    W = torch.randn(d_out, d_in, generator=g)
    k_star, k, v_star = torch.randn(d_in, generator=g), torch.randn(d_in, generator=g), torch.randn(d_out, generator=g)
    k = k_star + 0.3 * k  # a key near k* (the bare prompt's); ROME divides by k . C^-1 k*
    delta = rome_update(C, k_star, k, v_star, W @ k)
    assert torch.linalg.matrix_rank(delta.double(), rtol=1e-5) <= 1
    assert _close((W + delta) @ k, v_star, 1e-3)                      # W' k = v*
    u = k_star.double() if C is None else torch.linalg.solve(C, k_star.double())   # C^-1 k*
    x = torch.randn(d_in, generator=g, dtype=torch.float64)
    x = x - (x @ u) / (u @ u) * u                                      # x^T C^-1 k* = 0
    assert (delta.double() @ x).norm() <= 1e-4 * delta.norm() * x.norm()


@PROFILE
@given(seed=seeds, d_in=st.integers(2, 24), d=st.integers(1, 12), n=st.integers(1, 6),
       lam=st.floats(1e-2, 1e4), s=st.floats(1e-3, 1e3))
def test_memit_solves_its_normal_equations_and_is_scale_invariant(seed, d_in, d, n, lam, s):
    g = _rng(seed)
    C, K, R = _spd(d_in, g), torch.randn(d_in, n, generator=g), torch.randn(d, n, generator=g)
    delta = memit_update(C, K, R, lam).double()
    K, R = K.double(), R.double()
    lhs = delta @ (lam * C + K @ K.T)                                  # delta (lambda C + K K^T) = R K^T
    assert _close(lhs, R @ K.T, 1e-4)
    assert _close(memit_update(s * C, K, R, lam / s), delta, 1e-4)     # C -> sC, lambda -> lambda/s


@PROFILE
@given(seed=seeds, d_in=st.integers(4, 24), d=st.integers(1, 12), n=st.integers(1, 4), lam=st.floats(1e-1, 1e3))
def test_emmet_writes_every_edit_exactly_with_minimal_c_norm(seed, d_in, d, n, lam):
    g = _rng(seed)
    C, K, R = _spd(d_in, g), torch.randn(d_in, n, generator=g), torch.randn(d, n, generator=g)
    delta = emmet_update(C, K, R, lam, emmet_lambda=0.0).double()
    Kd, Rd = K.double(), R.double()
    assert _close(delta @ Kd, Rd, 1e-4)                                # delta K = R
    # any other solution differs by N with N K = 0, and has a larger C-norm tr(delta C delta^T)
    proj = torch.eye(d_in, dtype=torch.float64) - Kd @ torch.linalg.pinv(Kd)
    other = delta + torch.randn(d, d_in, generator=g, dtype=torch.float64) @ proj
    assert _close(other @ Kd, Rd, 1e-4)
    cnorm = lambda m: torch.trace(m @ C @ m.T).item()  # noqa: E731
    assert cnorm(delta) <= cnorm(other) * (1 + 1e-9) + 1e-12
    # one edit: ROME's rank-one formula with the same key in both places
    current = torch.randn(d, generator=g)
    one = emmet_update(C, K[:, :1], R[:, :1], lam, emmet_lambda=0.1)
    assert _close(one, rome_update(C, K[:, 0], K[:, 0], current + R[:, 0], current), 1e-4)


@PROFILE
@given(seed=seeds, d_in=st.integers(2, 20), d=st.integers(1, 10), n=st.integers(1, 5), rank=st.integers(0, 20),
       L2=st.floats(1e-2, 1e2))
def test_alphaedit_is_ridge_without_projection_and_stays_in_the_null_space(seed, d_in, d, n, rank, L2):
    g = _rng(seed)
    K, R = torch.randn(d_in, n, generator=g), torch.randn(d, n, generator=g)
    eye, zero = torch.eye(d_in), torch.zeros(d_in, d_in)
    # P = I, no cached keys: MEMIT's solve with C = I and lambda = L2, i.e. ridge regression R K^T (K K^T + L2 I)^-1
    assert _close(alphaedit_update(eye, zero, K, R, L2), memit_update(eye, K, R, L2), 1e-5)
    # a random projector and cached keys: the update never touches the preserved directions
    Q, _ = torch.linalg.qr(torch.randn(d_in, d_in, generator=g, dtype=torch.float64))
    U = Q[:, : min(rank, d_in)]
    P = U @ U.T
    Kp = torch.randn(d_in, 3, generator=g, dtype=torch.float64)
    delta = alphaedit_update(P, Kp @ Kp.T, K, R, L2).double()
    assert (delta @ (torch.eye(d_in, dtype=torch.float64) - P)).norm() <= 1e-5 * max(1.0, delta.norm().item())
    # the projector from C's small eigenvalues is one
    Pc = null_space_projector(_spd(d_in, g), threshold=0.5).double()
    assert _close(Pc @ Pc, Pc, 1e-5) and _close(Pc, Pc.T, 1e-6)


@PROFILE
@given(seed=seeds, d_in=st.integers(2, 16), d=st.integers(1, 8), sizes=st.lists(st.integers(1, 3), min_size=2, max_size=4))
def test_d4s_running_sums_are_order_free_and_equal_the_batch_solve(seed, d_in, d, sizes):
    g = _rng(seed)
    C = _spd(d_in, g)
    edits = [(torch.randn(d_in, m, generator=g, dtype=torch.float64), torch.randn(d, m, generator=g, dtype=torch.float64))
             for m in sizes]

    def sums(order):
        S_RK, S_KK = torch.zeros(d, d_in, dtype=torch.float64), torch.zeros(d_in, d_in, dtype=torch.float64)
        for K, R in order:
            S_RK, S_KK = S_RK + R @ K.T, S_KK + K @ K.T
        return S_RK, S_KK

    forward, backward = d4s_update(C, *sums(edits), 50.0, 2), d4s_update(C, *sums(edits[::-1]), 50.0, 2)
    K_all, R_all = torch.cat([k for k, _ in edits], 1), torch.cat([r for _, r in edits], 1)
    assert _close(forward, backward, 1e-5)
    assert _close(forward, memit_update(C, K_all, R_all / 2, 50.0), 1e-5)   # = one batch edit of all of them


# --- key averaging ------------------------------------------------------------------------------------------------
def _independent_key(lm, layer, text_template, subject):
    """The MLP output projection's input at the subject's last token of one unpadded text, by a plain hook."""
    module = lm.adapter.module(lm.model, lm.adapter.mlp_name(layer))
    tok = lm.tokenizer
    prefix = text_template[: text_template.index("{}")] + subject
    idx = len(tok(prefix).input_ids) - 1
    got = {}
    handle = module.register_forward_hook(lambda m, i, o: got.update(k=i[0][0, idx].detach().float()))
    try:
        with torch.no_grad():
            lm.model(torch.tensor([tok(text_template.format(subject)).input_ids]))
    finally:
        handle.remove()
    return got["k"]


@MODEL_PROFILE
@given(case_i=st.integers(0, 39), layer=st.integers(0, 3))
def test_memit_key_is_half_bare_half_generated_and_rome_key_is_flat(tiny_llama, builtin_cases, case_i, layer):
    lm, case = tiny_llama, builtin_cases[case_i]
    memit = build_editor("memit", lm, ["layers=[0,1]", "context_template_length_params=[[6,5]]"],
                         stats=types.SimpleNamespace())
    rome = build_editor("rome", lm, ["layer=1", "context_template_length_params=[[4,3],[6,2]]"])
    templates = memit.context_templates(lm)
    assert len(templates) == 6 and templates[0] == "{}"
    keys = [_independent_key(lm, layer, t.replace("{}", case.prompt) if t != "{}" else case.prompt, case.subject)
            for t in templates]
    expected = 0.5 * keys[0] + 0.5 * torch.stack(keys[1:]).mean(0)
    assert _close(memit.keys(lm, layer, [case])[:, 0], expected, 1e-4)
    from harness.editors.common import average_key
    r_templates = rome.context_templates(lm)
    assert len(r_templates) == 6
    r_keys = [_independent_key(lm, layer, t.replace("{}", case.prompt) if t != "{}" else case.prompt, case.subject)
              for t in r_templates]
    assert _close(average_key(lm, layer, case, r_templates), torch.stack(r_keys).mean(0), 1e-4)


def test_group_mean_weights():
    keys = torch.arange(12, dtype=torch.float64).reshape(6, 2)
    assert torch.allclose(group_mean(keys, [1, 5]), 0.5 * keys[0] + 0.5 * keys[1:].mean(0))
    assert torch.allclose(group_mean(keys, None), keys.mean(0))
    with pytest.raises(ValueError, match="do not cover"):
        group_mean(keys, [1, 4])


def test_context_templates_sample_like_generate_fast(tiny_llama):
    """Top-5 sampling at temperature 1 whatever the generation config says, ``length`` tokens in all (seed
    included); the templates are the decoded samples, leading space kept, plus ". {}"; a seed reproduces them."""
    from harness.data.corpus import sample_continuations, sample_ids
    from harness.editors.common import generate_context_templates

    lm = tiny_llama
    cfg = lm.model.generation_config
    saved = (cfg.do_sample, cfg.temperature, cfg.top_k)
    cfg.do_sample, cfg.temperature, cfg.top_k = False, 0.01, 1          # greedy if the config were used
    try:
        seed_ids = torch.tensor([lm.tokenizer("<|endoftext|>").input_ids] * 12)
        ids = sample_ids(lm.model, seed_ids, 7, top_k=5, generator=_rng(0))
        assert ids.shape == (12, 7) and torch.equal(ids[:, :1], seed_ids)
        with torch.no_grad():
            logits = lm.model(ids).logits[:, :-1]                             # position j predicts token j + 1
        rank = (logits > logits.gather(2, ids[:, 1:, None])).sum(-1)[:, seed_ids.shape[1] - 1:]
        assert rank.max() < 5 and rank.float().mean() > 0.5                 # within the top 5, not greedy
        a = generate_context_templates(lm, [[6, 4]], ["<|endoftext|>"], seed=3, brace="")
        texts = sample_continuations(lm, ["<|endoftext|>"] * 4, 6, generator=_rng(3))
    finally:
        cfg.do_sample, cfg.temperature, cfg.top_k = saved
    assert a == ["{}"] + [t.replace("{", "").replace("}", "") + ". {}" for t in texts]
    assert a == generate_context_templates(lm, [[6, 4]], ["<|endoftext|>"], seed=3, brace="")


# --- key statistics ------------------------------------------------------------------------------------------
@MODEL_PROFILE
@given(batch_size=st.integers(1, 7), seq_len=st.integers(4, 48), n_tokens=st.integers(50, 400),
       order=st.permutations(list(range(6))), layers=st.sets(st.integers(0, 3), min_size=1, max_size=2))
def test_second_moment_equals_explicit_mean_of_kkT(tiny_llama, batch_size, seq_len, n_tokens, order, layers):
    lm = tiny_llama
    texts = [load_texts("builtin")[i] for i in order]
    stats = LayerStats(lm, lambda: texts, "test", n_tokens=n_tokens, seq_len=seq_len, batch_size=batch_size,
                       progress=False)
    got = stats.second_moments(sorted(layers))
    # explicit: token windows of seq_len, each text alone, no padding
    windows, total = [], 0
    for t in texts:
        ids = lm.tokenizer(t).input_ids
        for s in range(0, len(ids), seq_len):
            w = ids[s:s + seq_len][: n_tokens - total]
            if len(ids[s:s + seq_len]) < 2:
                continue
            windows.append(w)
            total += len(w)
            if total >= n_tokens:
                break
        if total >= n_tokens:
            break
    for layer in layers:
        module = lm.adapter.module(lm.model, lm.adapter.mlp_name(layer))
        acc, count = 0, 0
        for w in windows:
            cap = {}
            h = module.register_forward_hook(lambda m, i, o: cap.update(k=i[0][0].double()))
            with torch.no_grad():
                lm.model(torch.tensor([w]))
            h.remove()
            acc, count = acc + cap["k"].T @ cap["k"], count + len(w)
        assert _close(got[layer].double(), acc / count, 1e-5)
    assert stats.provenance == {"corpus": "test", "tokens_requested": n_tokens, "tokens_used": total}


def test_statistics_warn_when_the_corpus_is_short(tiny_llama):
    stats = LayerStats(tiny_llama, lambda: ["one short text, a few tokens only"], "tiny-corpus", n_tokens=10_000,
                       progress=False)
    with pytest.warns(UserWarning, match="tokens of corpus 'tiny-corpus' used, 10000 asked for"):
        stats.second_moment(1)
    p = stats.provenance
    assert p["corpus"] == "tiny-corpus" and p["tokens_requested"] == 10_000 and 0 < p["tokens_used"] < 100


# --- v*: optimize_value against a naive port of ROME's compute_v ---------------------------------------------
def _naive_compute_v(lm, case, module_name, templates, opt):
    """kmeng01/rome ``compute_v``'s optimisation, ported line by line (full right-padded sequences, full logits,
    no KV cache); returns (target_init + delta, losses, kl at step 0, ||delta|| after each step)."""
    tok, model = lm.tokenizer, lm.model
    target_ids = tok(" " + case.target_new.strip(), add_special_tokens=False).input_ids
    rewriting = [(t.replace("{}", case.prompt) if t != "{}" else case.prompt) + tok.decode(target_ids[:-1])
                 for t in templates]
    kl_prompts = ["{} is a"]
    all_prompts = rewriting + kl_prompts
    enc = tok([p.format(case.subject) for p in all_prompts], return_tensors="pt", padding=True)
    targets = torch.full((len(rewriting), enc.input_ids.shape[1]), -100)
    for i in range(len(rewriting)):
        ex_len = int(enc.attention_mask[i].sum())
        targets[i, ex_len - len(target_ids): ex_len] = torch.tensor(target_ids)
    lookup = [subject_last_index(tok, p, case.subject) for p in all_prompts]
    module = model.get_submodule(module_name)
    delta = torch.zeros(model.config.hidden_size, requires_grad=True)
    state = {"init": None}

    def edit(_m, _i, out):
        out = out[0] if isinstance(out, tuple) else out
        if state["init"] is None:
            state["init"] = out[0, lookup[0]].detach().clone()
        out = out.clone()
        for i, idx in enumerate(lookup):
            out[i, idx] = out[i, idx] + delta
        return out

    optim = torch.optim.Adam([delta], lr=opt.lr)
    kl_init, losses, kl0, norms = None, [], None, []
    for it in range(opt.steps):
        optim.zero_grad()
        h = module.register_forward_hook(edit)
        try:
            logits = model(**enc).logits
        finally:
            h.remove()
        kl_logits = torch.stack([logits[i - len(kl_prompts), idx] for i, idx in enumerate(lookup[-len(kl_prompts):])])
        kl_logp = F.log_softmax(kl_logits, dim=1)
        if kl_init is None:
            kl_init = kl_logp.detach().clone()
        logp = torch.log_softmax(logits, dim=2)
        loss = torch.gather(logp[: len(rewriting)], 2, torch.where(targets != -100, targets, 0).unsqueeze(2)).squeeze(2)
        mask = (targets != -100).float()
        nll = (-(loss * mask).sum(1) / len(target_ids)).mean()
        kl = opt.kl_factor * F.kl_div(kl_init, kl_logp, log_target=True, reduction="batchmean")
        if it == 0:
            kl0 = kl.item()
        wd = opt.weight_decay * (delta.norm() / state["init"].norm() ** 2)
        total = nll + kl + wd
        losses.append(total.item())
        if total < opt.early_stop_loss or it == opt.steps - 1:
            break
        total.backward()
        optim.step()
        max_norm = opt.clamp_norm_factor * state["init"].norm()
        if delta.norm() > max_norm:
            with torch.no_grad():
                delta[...] = delta * max_norm / delta.norm()
        norms.append((delta.norm() / state["init"].norm()).item())
    return (state["init"] + delta).detach(), losses, kl0, norms


TEMPLATE_POOL = ["{}", "The weather. {}", " I went to the market and bought apples, then came home. {}",
                 "Because. {}", " You said that the city was large and old. {}"]


@MODEL_PROFILE
@given(case_i=st.integers(0, 39), n_templates=st.integers(1, 3), start=st.integers(0, 4),
       target=st.sampled_from([None, "Paris", "the United Kingdom of Great Britain"]),
       clamp=st.sampled_from([0.05, 4.0]), steps=st.integers(1, 6))
def test_optimize_value_equals_rome_compute_v(tiny_llama, builtin_cases, case_i, n_templates, start, target, clamp,
                                              steps):
    lm = tiny_llama
    case = builtin_cases[case_i]
    if target is not None:
        case = case.with_targets(target, case.target_true)
    templates = [TEMPLATE_POOL[(start + i) % len(TEMPLATE_POOL)] for i in range(n_templates)]
    opt = ValueOpt(steps=steps, lr=0.5, kl_factor=0.0625, weight_decay=0.5, clamp_norm_factor=clamp)
    module = lm.adapter.mlp_name(1)
    v_ours, v_init, info = optimize_value(lm, case, module, templates, opt)
    v_ref, losses, kl0, norms = _naive_compute_v(lm, case, module, templates, opt)
    assert kl0 == 0.0                                                       # no KL term at step 0
    assert all(n <= clamp * (1 + 1e-5) for n in norms)                      # the clamp holds after every step
    assert len(info["v_loss"]) == len(losses)
    assert all(abs(a - b) <= 1e-4 + 5e-5 for a, b in zip(info["v_loss"], losses))   # ours are rounded to 4 places
    assert (v_ours - v_ref).norm() <= 1e-4 * max(1.0, v_ref.norm().item())
    assert (v_ours - v_init).norm() <= clamp * v_init.norm() * (1 + 1e-5)


# --- fine-tuning losses --------------------------------------------------------------------------------------
def _rome_prompt_last_loss(lm, cases):
    """kmeng01/rome baselines/ft/ft_main.py's loss, ported line by line."""
    tok = lm.tokenizer
    txt = [c.rewrite_prompt for c in cases]
    tgt = [" " + c.target_new.strip() for c in cases]
    inputs = tok(txt, return_tensors="pt", padding=True)
    target_ids = tok(tgt, return_tensors="pt", padding=True)["input_ids"]
    last = inputs["attention_mask"].sum(dim=1) - 1
    loss_mask = target_ids != tok.pad_token_id      # the reference masks unk (GPT-2 pads with it)
    probs = F.log_softmax(lm.model(**inputs).logits[torch.arange(len(cases)), last], dim=-1)
    loss = -(torch.gather(probs, 1, target_ids) * loss_mask).sum(1) / loss_mask.sum(1)
    return loss.mean()


def _easyedit_target_new_loss(lm, cases):
    """EasyEdit easyeditor/models/ft/ft_main.py's ``target_new`` loss (FT-M), one case at a time (batch_size 1 in
    its Llama files, where its left-padding arithmetic is exact)."""
    tok, per_case = lm.tokenizer, []
    for c in cases:
        txt, tgt = c.rewrite_prompt, " " + c.target_new.strip()
        n_prompt = len(tok(txt).input_ids)
        full = tok(txt + tgt, return_tensors="pt")
        label_mask = torch.tensor([[False] * n_prompt + [True] * (full.input_ids.shape[1] - n_prompt)])
        logits = lm.model(**full).logits
        ce = F.cross_entropy(logits[0, :-1], full.input_ids[0, 1:], reduction="none")
        per_case.append((ce * label_mask[0, 1:]).sum() / label_mask[0, 1:].sum())
    return torch.stack(per_case).mean()


@MODEL_PROFILE
@given(idx=st.lists(st.integers(0, 39), min_size=1, max_size=4, unique=True))
def test_ft_losses_equal_the_references(tiny_lm, builtin_cases, idx):
    cases = [builtin_cases[i] for i in idx]
    with torch.no_grad():
        for name, reference in (("ft_l", _rome_prompt_last_loss), ("ft_m", _easyedit_target_new_loss)):
            ed = build_editor(name, tiny_lm, ["layer=1"])
            ours = ed.case_nll(tiny_lm, ed.batch(tiny_lm, cases)).mean()
            assert ours.item() == pytest.approx(reference(tiny_lm, cases).item(), rel=1e-5, abs=1e-6), name


def test_ft_variants_tune_the_whole_output_module_within_the_ball(tiny_gpt2, builtin_cases):
    ft = build_editor("ft_l", tiny_gpt2, ["layer=1", "num_steps=4", "lr=1e-2", "norm_constraint=1e-3"])
    assert build_editor("ft", tiny_gpt2, ["layer=1"]).hparams == build_editor("ft_l", tiny_gpt2, ["layer=1"]).hparams
    names = ft.edited_parameters(tiny_gpt2)
    assert names == [tiny_gpt2.adapter.weight_name(1), tiny_gpt2.adapter.mlp_name(1) + ".bias"]  # GPT-2: W and b
    edit = ft.apply(tiny_gpt2, builtin_cases[:2])
    try:
        deltas = edit.snapshot.deltas()
        assert all(0 < d.abs().max().item() <= 1e-3 + 1e-7 for d in deltas.values())
    finally:
        edit.restore()


# --- MEMIT on a tiny model: the residual spread over two layers --------------------------------------------------
class _FixedStats:
    """A LayerStats stand-in: C = I for every layer."""

    def __init__(self, d_in):
        self.d_in = d_in

    def second_moment(self, layer):
        return torch.eye(self.d_in)

    def second_moments(self, layers):
        return {layer: torch.eye(self.d_in) for layer in layers}


@MODEL_PROFILE
@given(case_i=st.integers(0, 39), seed=seeds)
def test_memit_spreads_the_residual_over_two_layers(tiny_llama, builtin_cases, case_i, seed):
    """With lambda -> 0 and the bare prompt as the only template, the first layer writes half the residual into its
    MLP output at the subject, and the last layer the rest: the hidden state at the last layer reaches z."""
    from harness.editors.common import module_io_at
    from harness.editors.memit import hidden_at_subjects

    lm, case = tiny_llama, builtin_cases[case_i]
    d_in = lm.adapter.weight_as_linear(lm.model, 1).shape[1]
    memit = build_editor("memit", lm, ["layers=[1,2]", "context_template_length_params=[]", "mom2_update_weight=1e-9"],
                         stats=_FixedStats(d_in))
    h0 = hidden_at_subjects(lm, 2, [case])                                   # [d, 1]
    R0 = 0.5 * torch.randn(h0.shape, generator=_rng(seed))
    memit.target_values = lambda lm_, cases: (h0 + R0, [{"v_loss": [0.0], "v_steps": 0}])
    idx = [subject_last_index(lm.tokenizer, case.prompt, case.subject)]
    mlp1 = lm.adapter.mlp_name(1)
    _, out_before = module_io_at(lm, mlp1, [case.rewrite_prompt], idx)
    edit = memit.apply(lm, [case])
    try:
        _, out_after = module_io_at(lm, mlp1, [case.rewrite_prompt], idx)
        assert _close(out_after - out_before, R0.T / 2, 1e-3)               # layer 1: half of the residual
        assert _close(hidden_at_subjects(lm, 2, [case]), h0 + R0, 1e-3)      # after layer 2: all of it
    finally:
        edit.restore()


# --- D4S on a tiny model: order independence and sequential = batch on the first layer ---------------------------
def test_d4s_first_layer_is_order_free_and_equals_the_batch(tiny_llama, builtin_cases):
    lm = tiny_llama
    d_in = lm.adapter.weight_as_linear(lm.model, 1).shape[1]
    hp = ["layers=[1,2]", "v_num_grad_steps=3", "context_template_length_params=[[4,5]]", "mom2_update_weight=10"]
    a, b = builtin_cases[0], builtin_cases[5]

    def first_layer_after(batches):
        d4s = build_editor("d4s", lm, hp, stats=_FixedStats(d_in))
        edits = [d4s.apply(lm, cases) for cases in batches]
        w = lm.adapter.mlp_weight(lm.model, 1).detach().clone()
        for e in reversed(edits):
            e.restore()
        return w

    ab, ba, batch = first_layer_after([[a], [b]]), first_layer_after([[b], [a]]), first_layer_after([[a, b]])
    assert _close(ab, ba, 1e-5) and _close(ab, batch, 1e-5)
