"""ROME's generation metrics: n-gram entropy by hand, TF-IDF similarity against a hand computation, seeded sampling,
and fluency falling when a model repeats itself."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from harness.metrics.generation import (counterfact_documents, fit_tfidf, fluency, generation_metrics,
                                        generation_prefixes, ngram_entropy, reference_texts, sample_texts,
                                        tfidf_similarity, word_tokenize)


def test_word_tokenize_like_nltk():
    assert word_tokenize("The cat sat. It's on the mat!") == ["The", "cat", "sat", ".", "It", "'s", "on", "the",
                                                               "mat", "!"]


def test_ngram_entropy_by_hand():
    # "a b a b": bigrams ab, ba, ab -> H2 = H(2/3, 1/3); trigrams aba, bab -> H3 = 1 bit
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert ngram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    assert ngram_entropy("Rome Rome Rome Rome Rome") == 0.0       # one repeated n-gram: no entropy
    assert ngram_entropy("one") == 0.0                            # no n-grams at all
    varied = "The museum opens at ten and the river runs north past the old mill."
    assert ngram_entropy(varied) > ngram_entropy("the the the the the the the the the the the the the the")
    assert fluency(["a b a b", "one"]) == pytest.approx(ngram_entropy("a b a b") / 2)
    with pytest.raises(ValueError):
        fluency([])


def test_tfidf_similarity_matches_hand_computation():
    docs = ["paris is in france", "rome is in italy", "the cat sat", "italy has rome and milan"]
    vec = fit_tfidf(docs)
    a, b = "rome italy italy", "milan is in italy"
    # sklearn's defaults: smooth idf = ln((1 + n) / (1 + df)) + 1, raw counts, l2-normalised rows
    vocab = sorted({w for d in docs for w in d.split()})
    df = {w: sum(w in d.split() for d in docs) for w in vocab}
    idf = {w: math.log((1 + len(docs)) / (1 + df[w])) + 1 for w in vocab}

    def vector(text):
        v = np.array([text.split().count(w) * idf[w] for w in vocab])
        return v / np.linalg.norm(v)

    assert tfidf_similarity(a, b, vec) == pytest.approx(float(vector(a) @ vector(b)))
    assert tfidf_similarity(a, a, vec) == pytest.approx(1.0)
    assert tfidf_similarity("zzz", a, vec) == 0.0                 # no known word: 0, not NaN


def test_reference_texts_and_prefixes(builtin_cases):
    case = builtin_cases[0]
    refs = reference_texts(case)
    assert refs and all(r.endswith(" " + case.target_new) for r in refs)
    assert generation_prefixes(case) == list(case.generation_prompts)
    bare = case.__class__(case_id="x", subject="BP", prompt="{} is based in", target_new="Oslo",
                          paraphrase_prompts=("BP has its head office in",))
    assert generation_prefixes(bare) == ["BP is based in", "BP has its head office in"]


def test_counterfact_documents(tmp_path):
    cf = tmp_path / "counterfact"
    cf.mkdir()
    rome = [{"case_id": 1, "requested_rewrite": {"prompt": "{} is in", "subject": "Angola",
                                                 "target_new": {"str": "Asia"}, "target_true": {"str": "Africa"}},
             "paraphrase_prompts": ["Angola lies in"], "neighborhood_prompts": ["Ghana is in"],
             "attribute_prompts": ["Japan is in"], "generation_prompts": ["Angola's capital"]}]
    easy = [{"case_id": 1, "prompt": "dup", "target_new": "x"},
            {"case_id": 2, "prompt": "The mother tongue of X is", "target_new": "English", "ground_truth": "French",
             "rephrase_prompt": "X speaks", "locality_prompt": "Y speaks", "locality_ground_truth": "French"}]
    (cf / "counterfact_rome_sample500.json").write_text(json.dumps(rome))
    (cf / "counterfact_easyedit_edit.json").write_text(json.dumps(easy))
    docs = counterfact_documents(tmp_path)
    assert len(docs) == 2                                       # case 1 once
    assert "Angola is in Africa" in docs[0] and "Japan is in Asia" in docs[0]
    assert "The mother tongue of X is French" in docs[1]
    with pytest.raises(FileNotFoundError, match="counterfact"):
        counterfact_documents(tmp_path / "nowhere")
    assert counterfact_documents(None, ["builtin text"]) == ["builtin text"]


def test_sampling_is_seeded_and_leaves_global_rng_alone(tiny_llama):
    import torch

    lm = tiny_llama
    prompts = ["Paris is the capital of", "Toronto is"]
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = sample_texts(lm.model, lm.tokenizer, prompts, max_out_len=20, seed=1)
    after = torch.rand(1)
    assert torch.equal(before, after)                           # the global RNG stream is untouched
    assert a == sample_texts(lm.model, lm.tokenizer, prompts, max_out_len=20, seed=1)
    assert a != sample_texts(lm.model, lm.tokenizer, prompts, max_out_len=20, seed=2)
    for p, t in zip(prompts, a):
        assert t.startswith(p)
        n = len(lm.tokenizer(t).input_ids)
        assert n <= 20 + 2                                       # max_out_len counts the prompt (+ BPE re-merge)


def test_fluency_falls_when_the_model_repeats(tiny_llama, builtin_cases):
    """A model forced to emit one token over and over has zero n-gram entropy in its continuations."""
    lm, case = tiny_llama, builtin_cases[0]
    vec = fit_tfidf([*reference_texts(case), *case.generation_prompts, "unrelated text about rivers"])
    normal, texts = generation_metrics(lm.model, lm.tokenizer, case, vectorizer=vec, max_out_len=40)
    word = lm.tokenizer(" " + case.target_new, add_special_tokens=False).input_ids[:1]
    head = lm.model.get_output_embeddings()

    def hook(module, args, out):
        out = out.clone()
        out[..., word] += 1e4
        return out

    handle = head.register_forward_hook(hook)
    try:
        collapsed, ctexts = generation_metrics(lm.model, lm.tokenizer, case, vectorizer=vec, max_out_len=40)
    finally:
        handle.remove()
    assert normal["fluency"] > collapsed["fluency"]
    assert normal["consistency"] is not None and 0.0 <= normal["consistency"] <= 1.0
    assert len(texts) == len(case.generation_prompts)
    _, other = generation_metrics(lm.model, lm.tokenizer, case, prefixes=["Toronto is"], max_out_len=20)
    assert len(other) == 1 and other[0].startswith("Toronto is")
    assert collapsed["consistency"] > normal["consistency"]     # it now keeps saying the new target's word
