"""Causal tracing and "Does Localization Inform Editing?" (Hase et al., 2023). Each known fact is traced (subject
embeddings noised, one layer's clean state restored at the subject's last token, for the residual stream, MLP and
attention outputs); then each (editor, window) edits known cases at every swept layer, and the run records how well
the tracing effect at a layer predicts edit success there (r2_tracing) against the layer index alone (r2_layer)."""
import pytest

from harness.problems import PROTOCOL

pytestmark = pytest.mark.suite("tracing")

TRACE = "causal tracing (ROME): P(answer | noised subject, clean state restored) - P(answer | noised subject)"


def test_causal_trace(harness, fact, record):
    with record.phase("trace"):
        result = harness.tracer.trace(fact.prompt, fact.subject, fact.attribute)
    m = result.metrics()
    record.add(m, protocol=TRACE)
    record.note(prompt=fact.prompt, answer=result.answer, subject_range=result.subject_range, window=result.window,
                noise=harness.tracer.noise, samples=harness.tracer.samples, embedding_std=harness.tracer.sigma)
    drop = m["corruption_drop"] / m["p_clean"]
    if drop < harness.thresholds.min_trace_drop:     # as in ROME, such facts are left out of the analysis
        pytest.skip(f"not traceable: the subject noise removes {drop:.2f} of P(answer)={m['p_clean']:.3f} < "
                    f"min_trace_drop {harness.thresholds.min_trace_drop} (the prompt gives the answer away)")
    effects = [e for kind in m["tracing_effect"].values() for e in kind]
    assert all(-1.0 <= e <= 1.0 for e in effects) and max(effects) > 0, (
        f"tracing effects out of range or never positive (max {max(effects):.3g}): restoring clean states "
        "recovered nothing at any layer")


def test_layer_sweep(harness, editor_name, sweep_window, record):
    try:
        with record.phase("sweep"):
            result = harness.layer_sweep(editor_name, sweep_window)
    except ValueError as e:          # e.g. ROME (one layer) asked for a window of several layers
        pytest.skip(str(e))
    m = result.metrics()
    record.add(m, {"tracing_effect": TRACE + ", hidden (residual) kind, mean over facts",
                   "edit_success": PROTOCOL + ": rewrite score of error injection, mean over facts",
                   "r2_tracing": "OLS R^2 of edit success on [1, tracing effect] over (fact, layer)",
                   "r2_layer": "OLS R^2 of edit success on one-hot(layer) over (fact, layer)",
                   "r2_both": "OLS R^2 of edit success on [one-hot(layer), tracing effect]"})
    record.note(window=sweep_window, facts=result.case_ids, layers=result.layers)
    assert m["best_edit_success"] >= harness.thresholds.min_sweep_success, (
        f"best_edit_success={m['best_edit_success']:.3f} (layer {m['best_layer']}) < min_sweep_success "
        f"{harness.thresholds.min_sweep_success}: {editor_name} edits no swept layer reliably")
