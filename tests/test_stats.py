"""Key statistics' default corpus without a data dir: text sampled from the model, cached on disk, keyed by its
settings; and the provenance the run reports."""
from __future__ import annotations

import json

from harness.data.corpus import MODEL_SAMPLES, model_sample_texts
from harness.stats import LayerStats


def test_model_samples_reach_the_token_count_and_are_cached(tiny_llama, tmp_path):
    settings = {"seq_len": 40, "batch_size": 4}
    texts = model_sample_texts(tiny_llama, 300, tmp_path, settings)
    n_tok = sum(len(tiny_llama.tokenizer(t).input_ids) for t in texts)
    assert n_tok >= 300 and len(set(texts)) == len(texts)           # enough tokens, every sequence its own
    (cached,) = tmp_path.glob("corpus/*/model-samples-*.json")
    saved = json.loads(cached.read_text())
    assert saved["texts"] == texts and saved["settings"]["seed"] == 0 and saved["settings"]["n_tokens"] == 300
    assert model_sample_texts(tiny_llama, 300, tmp_path, settings) == texts          # read back, not resampled
    other = model_sample_texts(tiny_llama, 300, tmp_path, {**settings, "seed": 1})   # another key, other text
    assert other != texts and len(list(tmp_path.glob("corpus/*/model-samples-*.json"))) == 2


def test_layer_stats_sample_the_model_for_model_samples(tiny_llama, tmp_path, monkeypatch):
    import harness.data.corpus as corpus

    monkeypatch.setitem(corpus.SAMPLE_SETTINGS, "seq_len", 40)
    stats = LayerStats(tiny_llama, lambda: (_ for _ in ()).throw(AssertionError("texts must not be read")),
                       MODEL_SAMPLES, n_tokens=200, cache_dir=tmp_path, progress=False)
    C = stats.second_moment(1)
    assert C.shape == (128, 128)
    assert stats.provenance == {"corpus": MODEL_SAMPLES, "tokens_requested": 200, "tokens_used": 200}
    again = LayerStats(tiny_llama, lambda: [], MODEL_SAMPLES, n_tokens=200, cache_dir=tmp_path, progress=False)
    again.second_moment(1)                                           # from the statistics cache
    assert again.last_compute_seconds is None and again.provenance["tokens_used"] == 200
