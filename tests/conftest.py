"""Fixtures for the unit tests: a byte-level BPE tokenizer trained here and tiny random GPT-2 / Llama models, so
every test runs offline in seconds."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from harness.data import load_cases, load_texts
from harness.models import from_pretrained_objects
from harness.stats import LayerStats

BUILTIN = Path(__file__).resolve().parents[1] / "harness" / "data" / "builtin"

# tests that start pytest or harness processes on a model saved to disk (seconds each, most of the suite's time)
_HEAVY_FIXTURES = {"pytester", "tiny_model_dir", "tiny_model_path"}


def pytest_configure(config):
    """Under pytest-xdist (``-n 2``): the processes a test starts (pytester, ``harness launch``) get this worker's
    share of the cores, as the plugin gives the worker itself, instead of every core each (oversubscribed torch
    threads spin and make a 2-core run slower than a serial one). An OMP_NUM_THREADS already set is kept."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cores // int(workers))))


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist: the slow and process-starting tests first (a stable sort: same order on every worker), so
    the workers share them out at the start instead of one worker finishing a long test alone at the end."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        items.sort(key=lambda item: 0 if item.get_closest_marker("slow") else
                   1 if _HEAVY_FIXTURES & set(getattr(item, "fixturenames", ())) else 2)


def _training_text() -> list[str]:
    texts = load_texts("builtin")
    for rec in json.loads((BUILTIN / "edits.json").read_text()) + json.loads((BUILTIN / "hard_edits.json").read_text()):
        rr = rec["requested_rewrite"]
        texts.append(rr["prompt"].format(rr["subject"]) + " " + rr["target_new"]["str"] + " " + rr["target_true"]["str"])
        texts += rec["paraphrase_prompts"] + rec["neighborhood_prompts"]
    return texts


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1200, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_training_text(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def _tiny(kind: str, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=64, n_layer=4,
                                           n_head=4, eos_token_id=tokenizer.eos_token_id))
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=256, eos_token_id=tokenizer.eos_token_id,
                                             pad_token_id=tokenizer.pad_token_id))
    return from_pretrained_objects(model, tokenizer, name=f"tiny-{kind}")


@pytest.fixture(scope="session", params=["gpt2", "llama"])
def tiny_lm(request, tiny_tokenizer):
    """A tiny random model of each family (the test runs once per family)."""
    return _tiny(request.param, tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_llama(tiny_tokenizer):
    return _tiny("llama", tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_gpt2(tiny_tokenizer):
    return _tiny("gpt2", tiny_tokenizer)


def make_stats(lm, tmp_path=None, n_tokens: int = 4000) -> LayerStats:
    return LayerStats(lm, lambda: load_texts("builtin"), "builtin", n_tokens=n_tokens, cache_dir=tmp_path,
                      progress=False)


@pytest.fixture(scope="session")
def builtin_cases():
    return load_cases("builtin")


# hyper-parameters that fit a 4-layer model and keep tests fast
TINY_HPARAMS = {
    "rome": ["layer=1", "v_num_grad_steps=8", "context_template_length_params=[[3,2]]"],
    "memit": ["layers=[1,2]", "v_num_grad_steps=8", "context_template_length_params=[[3,2]]"],
    "ft": ["layer=1", "num_steps=5"],
}


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_llama, tmp_path_factory):
    """The tiny Llama saved with ``save_pretrained`` (model and tokenizer): a ``--model`` directory for suite runs."""
    d = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama.model.save_pretrained(d)
    tiny_llama.tokenizer.save_pretrained(d)
    return d
