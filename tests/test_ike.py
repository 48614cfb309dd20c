"""IKE on tiny random models: the weights never change, the prefix (demonstrations + new facts) is in every scored
input, retrieval brings the most similar pool demonstrations (never the edited subject's), a stream keeps every fact,
and pools in both training formats load (a malformed one fails naming the field)."""
from __future__ import annotations

import io
import json

import pytest
import torch

from harness.data.pool import PoolError, load_pool
from harness.editors import build_editor
from harness.metrics import counterfact_metrics
from harness.models import param_digest


def test_weights_never_change_and_the_prefix_is_in_every_scored_input(tiny_lm, builtin_cases):
    case = builtin_cases[0]
    digest = param_digest(tiny_lm.model)
    ike = build_editor("ike", tiny_lm, ["k=4"])
    edit = ike.apply(tiny_lm, [case])
    assert param_digest(tiny_lm.model) == digest and edit.snapshot is None
    prefix = edit.prompt_prefix
    assert prefix.endswith(f"New Fact: {case.rewrite_prompt} {case.target_new}\nPrompt: ")
    assert prefix.count("New Fact:") == 4 + 1                              # k demonstrations + the new fact

    prefix_ids = tiny_lm.tokenizer(prefix).input_ids
    calls = []                       # (positions already cached, token rows of this forward pass)

    def keep_inputs(_module, _args, kwargs):
        ids, past = kwargs["input_ids"], kwargs.get("cache", kwargs.get("past_key_values"))
        mask = kwargs.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask[:, -ids.shape[1]:]
        calls.append((past.get_seq_length() if past is not None else 0,
                      [r[m.bool()].tolist() for r, m in zip(ids, mask)]))

    handle = tiny_lm.model.base_model.register_forward_pre_hook(keep_inputs, with_kwargs=True)
    try:
        counterfact_metrics(tiny_lm.model, tiny_lm.tokenizer, case, prefix=prefix)
    finally:
        handle.remove()
    # the prefix's tokens run once (the first pass, one row); every scored row continues its cached keys
    (n0, (shared,)), rest = calls[0], calls[1:]
    assert n0 == 0 and all(n == len(shared) for n, _ in rest)
    rows = [shared + r for _, rs in rest for r in rs]
    n_prompts = 1 + len(case.paraphrase_prompts) + len(case.neighborhood_prompts)
    assert len(rows) == 2 * n_prompts                                      # new and true target for each prompt
    # byte-level BPE may merge the prefix's last token with the prompt's first: compare all but that token
    assert all(r[:len(prefix_ids) - 1] == prefix_ids[:-1] for r in rows)
    assert param_digest(tiny_lm.model) == digest


def test_retrieval_finds_similar_demonstrations_in_order_and_never_the_subject(tiny_llama, builtin_cases, tmp_path):
    case = builtin_cases[0]                                                # Toronto, located in the country of
    pool = json.loads(load_pool.__globals__["BUILTIN_POOL"].read_text())
    leak = dict(pool[0], subject=case.subject, prompt=case.rewrite_prompt, target_new=case.target_new,
                rephrase_prompt=case.paraphrase_prompts[0])
    path = tmp_path / "pool.json"
    path.write_text(json.dumps(pool + [leak]))
    ike = build_editor("ike", tiny_llama, ["k=3", f"pool={path}"])
    demos = ike.retrieve([case])
    assert len(demos) == 3 and not any(case.subject in d for d in demos)   # the leak guard
    assert all("located in the country of" in d for d in demos)           # the same relation's demonstrations
    scores = [ike.index().scores(f"New Fact: {case.rewrite_prompt} {case.target_new}\nPrompt: "
                                 f"{case.rewrite_prompt}\n\n")[ike._sentences.index(d)].item() for d in demos]
    assert scores == sorted(scores)                                        # ascending: the most similar last
    desc = build_editor("ike", tiny_llama, ["k=3", f"pool={path}", "order=descending"]).retrieve([case])
    assert desc == demos[::-1]


def test_a_stream_keeps_every_fact_and_undo_and_state_are_exact(tiny_llama, builtin_cases):
    a, b = builtin_cases[0], builtin_cases[1]
    ike = build_editor("ike", tiny_llama, ["k=2"])
    e1 = ike.apply(tiny_llama, [a])
    e2 = ike.apply(tiny_llama, [b])
    facts = [f"New Fact: {c.rewrite_prompt} {c.target_new}\n" for c in (a, b)]
    assert e2.prompt_prefix.endswith(facts[0] + facts[1] + "Prompt: ")
    buf = io.BytesIO()
    torch.save(ike.state(), buf)
    e2.restore()
    assert ike.prefix() == e1.prompt_prefix
    e1.restore()
    assert ike.prefix() == ""
    buf.seek(0)
    resumed = build_editor("ike", tiny_llama, ["k=2"])
    resumed.load_state(torch.load(buf, weights_only=True))
    assert resumed.prefix() == e2.prompt_prefix
    resumed.reset()
    assert resumed.prefix() == ""


def test_pool_formats_and_errors(tmp_path):
    zsre = [{"subject": "UniFirst", "src": "What is the product made by UniFirst?", "alt": "unmanned aircraft",
             "answers": ["uniform"], "rephrase": "What will be the product of UniFirst?",
             "loc": "nq question: who sang hey jude", "loc_ans": "The Beatles"}]
    (tmp_path / "zsre.json").write_text(json.dumps(zsre))
    (rec,) = load_pool(str(tmp_path / "zsre.json"))
    assert (rec.prompt, rec.target_new, rec.locality_answer) == (zsre[0]["src"], "unmanned aircraft", "The Beatles")
    assert len(load_pool("builtin")) == 40
    bad = [{k: v for k, v in zsre[0].items() if k != "rephrase"}]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(PoolError, match="record 0: missing field 'rephrase'"):
        load_pool(str(tmp_path / "bad.json"))
    with pytest.raises(PoolError, match="no such file"):
        load_pool(str(tmp_path / "absent.json"))


def test_a_prefix_longer_than_the_context_is_a_clear_error(tiny_gpt2, builtin_cases):
    ike = build_editor("ike", tiny_gpt2, ["k=60"])                        # the tiny GPT-2 has 256 positions
    with pytest.raises(ValueError, match="lower --hparam ike.k"):
        ike.apply(tiny_gpt2, [builtin_cases[0]])
    assert ike.prefix() == ""


def test_ike_refuses_other_editing_problems(tiny_llama, builtin_cases):
    with pytest.raises(ValueError, match="does not apply"):
        build_editor("ike", tiny_llama, []).apply(tiny_llama, [builtin_cases[0].with_objective("erase")])
