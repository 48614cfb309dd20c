"""Causal tracing and "Does Localization Inform Editing?" (Hase et al., 2023). Each known fact is traced (subject
embeddings noised, one layer's clean state restored at the subject's last token, for the residual stream, MLP and
attention outputs); then each (editor, window) edits known cases at every swept layer, and the run records how well
the tracing effect at a layer predicts edit success there (r2_tracing) against the layer index alone (r2_layer)."""
import pytest

from harness import protocols

pytestmark = pytest.mark.suite("tracing")


def test_causal_trace(harness, fact, record):
    m = protocols.causal_trace(harness, fact, record.timer)
    record.add(m)
    if reason := harness.thresholds.untraceable(m):      # as in ROME, such facts are left out of the analysis
        pytest.skip(reason)
    assert not (bad := harness.thresholds.violations_tracing(m)), "; ".join(bad)
    assert not (bad := harness.thresholds.violations_tracing_results(m)), "; ".join(bad)


def test_layer_sweep(harness, editor_name, sweep_window, record):
    if reason := protocols.sweep_unsupported(harness, editor_name, sweep_window):   # e.g. ROME over 3 layers
        pytest.skip(reason)
    m = protocols.layer_sweep(harness, editor_name, sweep_window, record.timer)
    record.add(m)
    assert not (bad := harness.thresholds.violations_layer_sweep(m)), "; ".join(bad)
