"""The editors aimed at sequential editing and model collapse, on tiny random models: R-ROME (its key is k*, and it
is ROME when k* is the bare key), AlphaEdit (its update lies in the null space of the preserved keys; it caches the
earlier edits' keys), D4S (running sums re-solved from W_0: two sequential edits are one batch edit) and bit-exact
restore for all three."""
from __future__ import annotations

import pytest
import torch

from harness.editors import alphaedit, build_editor, d4s, emmet, r_rome, registry  # noqa: F401  (registration)
from harness.editors.common import average_key, plain_key_value
from harness.models import param_digest

from .conftest import make_stats

SMALL = ["v_num_grad_steps=6", "context_template_length_params=[[3,2]]"]
HP = {"r_rome": ["layer=1", *SMALL], "rome": ["layer=1", *SMALL], "memit": ["layers=[1,2]", *SMALL],
      "alphaedit": ["layers=[1,2]", *SMALL], "d4s": ["layers=[1,2]", *SMALL], "emmet": ["layers=[1]", *SMALL]}


def _editor(name, lm, extra=(), stats=None):
    return build_editor(name, lm, [*HP[name], *extra], stats=stats or make_stats(lm))


def _as_linear(lm, delta_stored):
    """A stored-layout weight delta as [d_out, d_in]."""
    return delta_stored.T if lm.adapter.transposed else delta_stored


def _weights(lm, editor):
    params = dict(lm.model.named_parameters())
    return {n: params[n].detach().clone() for n in editor.edited_parameters(lm)}


def _threshold_splitting_spectrum(stats, layers):
    """A null-space threshold that leaves both subspaces non-empty at every layer (the tiny models' C is ~1e-4, so
    the official 2e-2 would make the whole key space "null")."""
    eig = torch.cat([torch.linalg.eigvalsh(stats.second_moment(layer).double()) for layer in layers])
    return float(eig.median())


def test_registered():
    assert {"r_rome", "alphaedit", "d4s"} <= set(registry.names())
    assert registry.get("alphaedit").supports_batch and registry.get("d4s").supports_batch
    assert not registry.get("r_rome").supports_batch


# --- R-ROME ----------------------------------------------------------------------------------------------
def test_r_rome_is_rank_one_and_maps_k_star_to_v_star(tiny_lm, builtin_cases):
    editor = _editor("r_rome", tiny_lm)
    case, layer = builtin_cases[0], editor.hparams.layer
    upd = editor.rank_one_update(tiny_lm, case)
    sv = torch.linalg.svdvals(upd.delta.double())
    assert sv[0] > 0 and (sv[1] / sv[0]).item() < 1e-5                      # rank one
    k_star = average_key(tiny_lm, layer, case, editor.context_templates(tiny_lm))
    k_bare, _ = plain_key_value(tiny_lm, layer, case)
    assert torch.allclose(upd.key, k_star)                                  # the key is k* ...
    assert not torch.allclose(k_bare, k_star, rtol=1e-3, atol=1e-4)          # ... which is not the bare key here
    edit = editor.apply(tiny_lm, [case])
    try:
        module = tiny_lm.adapter.module(tiny_lm.model, tiny_lm.adapter.mlp_name(layer))
        with torch.no_grad():
            v_after = module(k_star[None]).float()[0]                       # the edited layer's output for k*
        assert torch.allclose(v_after, upd.value, atol=1e-3 * upd.value.norm().item())
    finally:
        edit.restore()


def test_r_rome_equals_rome_when_k_star_is_the_bare_key(tiny_lm, builtin_cases):
    """With only the "{}" template k* is the bare prompt's key, and R-ROME's W k* + b is ROME's current value."""
    stats = make_stats(tiny_lm)
    only_bare = ["context_template_length_params=[]"]
    rome, rrome = _editor("rome", tiny_lm, only_bare, stats), _editor("r_rome", tiny_lm, only_bare, stats)
    assert rrome.context_templates(tiny_lm) == ["{}"]
    a, b = rome.rank_one_update(tiny_lm, builtin_cases[0]), rrome.rank_one_update(tiny_lm, builtin_cases[0])
    assert torch.allclose(a.key, b.key, atol=1e-6)
    assert torch.allclose(a.delta, b.delta, rtol=1e-4, atol=1e-5 * a.delta.abs().max().item())


# --- AlphaEdit -------------------------------------------------------------------------------------------
def _capture_updates(editor, monkeypatch):
    """Record each layer's delta [d, d_in] as AlphaEdit computes it."""
    seen: dict[int, list[torch.Tensor]] = {}
    solve = editor.layer_update

    def spy(lm, layer, K, R):
        delta = solve(lm, layer, K, R)
        seen.setdefault(layer, []).append(delta.double())
        return delta

    monkeypatch.setattr(editor, "layer_update", spy)
    return seen


def test_alphaedit_update_lies_in_the_null_space_of_preserved_keys(tiny_lm, builtin_cases, monkeypatch):
    stats = make_stats(tiny_lm)
    thr = _threshold_splitting_spectrum(stats, [1, 2])
    editor = _editor("alphaedit", tiny_lm, [f"nullspace_threshold={thr}"], stats)
    seen = _capture_updates(editor, monkeypatch)
    edit = editor.apply(tiny_lm, builtin_cases[:2])
    try:
        for layer in editor.hparams.layers:
            (delta,) = seen[layer]                                                          # [d, d_in]
            P = editor.null_space_projector(tiny_lm, layer).double()                       # [d_in, d_in]
            assert 0 < editor.nullspace_dim(tiny_lm, layer) < P.shape[0]
            assert delta.norm() > 0
            # delta P_perp = 0: the update does not see the preserved (large-eigenvalue) key directions
            P_perp = torch.eye(P.shape[0], dtype=P.dtype) - P
            assert (delta @ P_perp).norm() / delta.norm() < 1e-4
            # so for preserved keys k0 = U_large c: delta k0 ~= 0, while a null-space key is moved
            s, U = torch.linalg.eigh(stats.second_moment(layer).double())
            k0 = U[:, s >= thr] @ torch.randn(int((s >= thr).sum()), 3, dtype=torch.float64)   # [d_in, 3]
            assert (delta @ k0).norm() / (delta.norm() * k0.norm()) < 1e-4
            # the update the model received is this delta (up to float32 rounding of W + delta)
            applied = _as_linear(tiny_lm, edit.snapshot.deltas()[tiny_lm.adapter.weight_name(layer)]).double()
            assert (applied - delta).norm() / delta.norm() < 1e-3
    finally:
        edit.restore()


def test_alphaedit_accumulates_keys_across_edits_and_reset_clears_them(tiny_llama, builtin_cases, monkeypatch):
    lm, stats = tiny_llama, make_stats(tiny_llama)
    thr = _threshold_splitting_spectrum(stats, [1, 2])
    # the tiny model's keys are small (|k|^2 ~ 1e-2): a small ridge lets K_p K_p^T weigh in the solve
    editor = _editor("alphaedit", lm, [f"nullspace_threshold={thr}", "L2=1e-4"], stats)
    before = param_digest(lm.model)
    e1 = editor.apply(lm, [builtin_cases[0]])
    kk1 = {layer: editor.previous_keys(layer, 128, "cpu").clone() for layer in editor.hparams.layers}
    assert e1.info["edits_in_cache"] == 1
    assert all(torch.linalg.matrix_rank(kk, rtol=1e-8) == 1 for kk in kk1.values())   # K_p K_p^T of one key
    e2 = editor.apply(lm, [builtin_cases[1]])
    assert e2.info["edits_in_cache"] == 2
    for layer in editor.hparams.layers:
        kk2 = editor.previous_keys(layer, 128, "cpu")
        assert torch.linalg.matrix_rank(kk2, rtol=1e-8) == 2 and not torch.allclose(kk2, kk1[layer])
    n_projectors = len(editor._projectors)

    # the cache changes the second edit: without it (after reset) the same edit solves differently
    seen = _capture_updates(editor, monkeypatch)
    e3 = editor.apply(lm, [builtin_cases[2]])
    e3.restore()
    editor.reset()
    assert editor._prev_kk == {} and len(editor._projectors) == n_projectors   # projectors stay cached
    assert torch.count_nonzero(editor.previous_keys(1, 128, "cpu")) == 0
    e3 = editor.apply(lm, [builtin_cases[2]])
    e3.restore()
    with_cache, without = seen[1]
    assert (with_cache - without).norm() / without.norm() > 1e-2
    editor.reset()

    e2.restore()
    e1.restore()
    assert param_digest(lm.model) == before


# --- D4S -------------------------------------------------------------------------------------------------
def test_d4s_two_sequential_edits_equal_one_batch_solve_from_w0(tiny_lm, builtin_cases):
    """The defining property: after edits A then B the layers hold W_0 + S_RK (lambda C + S_KK)^-1 with both
    edits in the sums, i.e. a batch edit of [A, B] from W_0. Exact at the first edit layer, whose keys no edit can
    change; at later layers edit A's keys were taken with the earlier layers as re-solved at A's time, so the
    match is close, not exact (as in the official code)."""
    lm, stats = tiny_lm, make_stats(tiny_lm)
    editor = _editor("d4s", lm, stats=stats)
    editor.value_batch = 1      # the batch edit's z one at a time too, as the sequential edits': this test is about
    first, last = (lm.adapter.weight_name(layer) for layer in editor.hparams.layers)   # the sums, exact to 1e-4
    before, w0 = param_digest(lm.model), _weights(lm, editor)

    e1 = editor.apply(lm, [builtin_cases[0]])
    assert all(torch.equal(editor._w0[layer], w0[lm.adapter.weight_name(layer)]) for layer in editor.hparams.layers)
    e2 = editor.apply(lm, [builtin_cases[1]])
    assert e2.info["edits_in_sums"] == 2
    sequential, s_kk_seq = _weights(lm, editor), editor._s_kk[1].clone()
    e2.restore()
    e1.restore()
    editor.reset()
    assert param_digest(lm.model) == before

    eb = editor.apply(lm, builtin_cases[:2])
    batch, s_kk_batch = _weights(lm, editor), editor._s_kk[1].clone()
    eb.restore()
    editor.reset()
    assert param_digest(lm.model) == before

    assert torch.allclose(s_kk_seq, s_kk_batch, rtol=1e-6, atol=1e-12)
    d_seq, d_batch = sequential[first] - w0[first], batch[first] - w0[first]
    assert d_batch.norm() > 0
    assert torch.allclose(d_seq, d_batch, rtol=1e-4, atol=1e-5 * d_batch.abs().max().item())
    d_seq, d_batch = sequential[last] - w0[last], batch[last] - w0[last]
    assert ((d_seq - d_batch).norm() / d_batch.norm()).item() < 1e-2


def test_d4s_state_lives_across_edits_and_reset_clears_it(tiny_llama, builtin_cases):
    lm, stats = tiny_llama, make_stats(tiny_llama)
    editor = _editor("d4s", lm, stats=stats)
    before = param_digest(lm.model)
    e1 = editor.apply(lm, [builtin_cases[0]])
    e2 = editor.apply(lm, [builtin_cases[1]])
    assert set(editor._s_rk) == set(editor._s_kk) == set(editor.hparams.layers) == set(editor._w0)
    assert all(torch.linalg.matrix_rank(editor._s_kk[layer], rtol=1e-8) == 2 for layer in editor.hparams.layers)
    # restoring without reset() leaves sums the model no longer holds: the next edit refuses, leaving no trace
    e2.restore()
    mid = param_digest(lm.model)
    with pytest.raises(RuntimeError, match="reset"):
        editor.apply(lm, [builtin_cases[2]])
    assert param_digest(lm.model) == mid
    editor.reset()
    assert not (editor._w0 or editor._s_rk or editor._s_kk) and editor._n_edits == 0
    # after reset() the next edit starts a new sequence: its W_0 is the model as it is then (edit 1 applied)
    e3 = editor.apply(lm, [builtin_cases[2]])
    assert e3.info["edits_in_sums"] == 1
    name = lm.adapter.weight_name(editor.hparams.layers[0])
    assert torch.equal(editor._w0[editor.hparams.layers[0]], e3.snapshot.saved[name])
    e3.restore()
    e1.restore()
    editor.reset()
    assert param_digest(lm.model) == before


def test_d4s_delta_norm_against_sequential_memit(tiny_lm, builtin_cases):
    """What we observe on the tiny models after two edits (lambda = 15000, K K^T << lambda C): at the first edit
    layer, where D4S's sums are exactly the batch solve and both editors see the same residual, D4S's delta is no
    larger than MEMIT's stacked one (the two differ only at second order here). At the last layer D4S's delta is
    somewhat larger: the official D4S spreads the residual measured once on W_0 (layer i gets S_RK / (|L| - i),
    the last the whole residual), while MEMIT re-measures it after each layer. D4S's advantage, a norm that does
    not grow like a sum of independent updates, shows once S_KK is comparable to lambda C (long sequences)."""
    lm, stats = tiny_lm, make_stats(tiny_lm)
    norms = {}
    for name in ("d4s", "memit"):
        editor = _editor(name, lm, stats=stats)
        w0 = _weights(lm, editor)
        edits = [editor.apply(lm, [c]) for c in builtin_cases[:2]]
        norms[name] = [float((w - w0[n]).norm()) for n, w in _weights(lm, editor).items()]
        for e in reversed(edits):
            e.restore()
        editor.reset()
    (d4s_first, d4s_last), (memit_first, memit_last) = norms["d4s"], norms["memit"]
    assert 0 < d4s_first <= memit_first * (1 + 1e-3)
    assert memit_last <= d4s_last * (1 + 1e-3) and d4s_last < 1.5 * memit_last


# --- EMMET ----------------------------------------------------------------------------------------------
def test_emmet_writes_every_edit_of_a_batch_exactly(tiny_lm, builtin_cases, monkeypatch):
    """The equality constraint: with emmet_lambda = 0, delta K = R for every edit of the batch (MEMIT only
    approximates it), and the model receives that delta."""
    stats = make_stats(tiny_lm)
    editor = _editor("emmet", tiny_lm, ["emmet_lambda=0"], stats)
    seen: list[tuple[torch.Tensor, ...]] = []
    solve = editor.layer_update

    def spy(lm, layer, K, R):
        delta = solve(lm, layer, K, R)
        seen.append((K.double(), R.double(), delta.double()))
        return delta

    monkeypatch.setattr(editor, "layer_update", spy)
    edit = editor.apply(tiny_lm, builtin_cases[:3])
    try:
        ((K, R, delta),) = seen                                             # one layer: [d_in, 3], [d, 3]
        assert torch.allclose(delta @ K, R, atol=1e-4 * R.abs().max().item())
        applied = _as_linear(tiny_lm, edit.snapshot.deltas()[tiny_lm.adapter.weight_name(1)]).double()
        assert (applied - delta).norm() / delta.norm() < 1e-3
        memit = build_editor("memit", tiny_lm, ["layers=[1]", *SMALL], stats=stats)
        m_delta = memit.layer_update(tiny_lm, 1, K.float(), R.float()).double()
        assert (m_delta @ K - R).norm() > 10 * (delta @ K - R).norm()      # MEMIT trades the constraint off
    finally:
        edit.restore()


def test_emmet_ridge_on_d_only_for_batches(tiny_llama, builtin_cases):
    stats = make_stats(tiny_llama)
    K = torch.randn(128, 1, dtype=torch.float64) * 0.1
    R = torch.randn(64, 1, dtype=torch.float64)
    a = _editor("emmet", tiny_llama, ["emmet_lambda=0"], stats).layer_update(tiny_llama, 1, K, R)
    b = _editor("emmet", tiny_llama, ["emmet_lambda=10"], stats).layer_update(tiny_llama, 1, K, R)
    assert torch.equal(a, b)                                                # n = 1: no ridge, exact
    K2, R2 = torch.cat([K, K * 1.01], 1), torch.cat([R, -R], 1)             # two nearly parallel keys
    c = _editor("emmet", tiny_llama, ["emmet_lambda=10"], stats).layer_update(tiny_llama, 1, K2, R2)
    assert torch.isfinite(c).all() and c.norm() < a.norm() * 10


# --- state across a checkpoint -------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["alphaedit", "d4s"])
def test_state_survives_a_checkpoint(name, tiny_llama, builtin_cases):
    """state() saved with torch.save and loaded with weights_only=True resumes the sequence exactly."""
    import io

    lm, stats = tiny_llama, make_stats(tiny_llama)
    extra = [f"nullspace_threshold={_threshold_splitting_spectrum(stats, [1, 2])}", "L2=1e-4"] \
        if name == "alphaedit" else []
    first = _editor(name, lm, extra, stats)
    before = param_digest(lm.model)
    e1 = first.apply(lm, [builtin_cases[0]])
    buf = io.BytesIO()
    torch.save(first.state(), buf)
    e2 = first.apply(lm, [builtin_cases[1]])
    continued = _weights(lm, first)
    e2.restore()
    resumed = _editor(name, lm, extra, stats)
    buf.seek(0)
    resumed.load_state(torch.load(buf, weights_only=True))
    e2 = resumed.apply(lm, [builtin_cases[1]])
    assert all(torch.equal(w, continued[n]) for n, w in _weights(lm, resumed).items())
    e2.restore()
    e1.restore()
    assert param_digest(lm.model) == before


# --- restore ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["r_rome", "alphaedit", "d4s"])
def test_sequential_edits_restore_bit_exactly(name, tiny_lm, builtin_cases):
    stats = make_stats(tiny_lm)
    extra = [f"nullspace_threshold={_threshold_splitting_spectrum(stats, [1, 2])}"] \
        if name == "alphaedit" else []
    editor = _editor(name, tiny_lm, extra, stats)
    digests = [param_digest(tiny_lm.model)]
    edits = []
    for case in builtin_cases[:2]:
        edits.append(editor.apply(tiny_lm, [case]))
        assert edits[-1].changed_parameters == editor.edited_parameters(tiny_lm)
        digests.append(param_digest(tiny_lm.model))
    assert len(set(digests)) == 3                          # every edit changed the model
    for edit, digest in zip(reversed(edits), reversed(digests[:-1])):
        edit.restore()
        assert param_digest(tiny_lm.model) == digest       # each restore undoes exactly its own edit
    editor.reset()
