"""How the harness treats editors that add instead of writing (GRACE, WISE, LoRA) and in-context editors (IKE):
perplexity read after a prompt prefix, a left-behind hook caught after the test, a sequential stream scored and
perplexity-measured through the latest prefix (journaled for --resume), problems an editor cannot be asked named."""
from __future__ import annotations

import pytest

from harness.data import load_texts
from harness.editing import RestoreError, edited
from harness.editors import build_editor
from harness.metrics.perplexity import perplexity
from harness.problems import problem_unsupported
from harness.sequential import SequentialRun
from harness.timing import PhaseTimer


def test_perplexity_after_a_prefix_scores_the_same_tokens(tiny_llama):
    texts = load_texts("builtin")[:4]
    plain = perplexity(tiny_llama.model, tiny_llama.tokenizer, texts)
    assert perplexity(tiny_llama.model, tiny_llama.tokenizer, texts, prefix="") == plain
    prefixed = perplexity(tiny_llama.model, tiny_llama.tokenizer, texts, prefix="New Fact: the sky is green\nPrompt: ")
    assert prefixed.n_tokens == plain.n_tokens                      # the prefix is context, never scored
    assert prefixed.per_text != plain.per_text                      # ... but it is read


def test_a_hook_left_behind_fails_the_restore_check(tiny_llama, builtin_cases):
    grace = build_editor("grace", tiny_llama, ["layer=2", "n_iter=3"])
    grace.prepare(tiny_llama)
    grace.reset = lambda: None                                      # an editor that forgets to detach
    with pytest.raises(RestoreError, match="still holds a hook"):
        with edited(tiny_llama, grace, [builtin_cases[0]]) as edit:
            edit.undo = lambda: None
    grace._detach()
    with edited(tiny_llama, build_editor("grace", tiny_llama, ["layer=2", "n_iter=3"]), [builtin_cases[0]]):
        pass                                                        # a well-behaved editor passes


def test_a_stream_reads_the_model_through_the_latest_prefix(tiny_llama, builtin_cases, tmp_path):
    ike = build_editor("ike", tiny_llama, ["k=2"])
    seen = []
    run = SequentialRun(tiny_llama, ike, builtin_cases[:3], perplexity=lambda: seen.append(run.prompt_prefix) or 1.0,
                        ppl_base=1.0, journal_dir=tmp_path, ppl_schedule="every")
    result = run.run(PhaseTimer(tiny_llama.device))
    assert len(seen) == 3 and all(p.count("New Fact: ") == 2 + n for n, p in enumerate(seen, start=1))
    steps = [s for s in (line for line in run.journal.read_text().splitlines()) if s]
    assert all('"prompt_prefix"' in s for s in steps)               # journaled: --resume continues with it
    assert ike.prefix() == ""                                        # reset after the stream
    assert set(result.final) == {c.case_id for c in builtin_cases[:3]}

    # resuming after the last edit re-scores through the journaled prefix
    ike2 = build_editor("ike", tiny_llama, ["k=2"])
    resumed = SequentialRun(tiny_llama, ike2, builtin_cases[:3], perplexity=lambda: 1.0, ppl_base=1.0,
                            journal_dir=tmp_path, ppl_schedule="every", resume=True)
    again = resumed.run(PhaseTimer(tiny_llama.device))
    assert again.resumed_from == 3 and resumed.prompt_prefix == seen[-1]
    assert again.final == result.final


def test_problems_an_editor_cannot_be_asked_are_named(tiny_llama):
    ike = build_editor("ike", tiny_llama, [])
    assert problem_unsupported(ike, "error_injection") is None
    assert "fact_erasure needs 'erase'" in problem_unsupported(ike, "fact_erasure")
    grace = build_editor("grace", tiny_llama, ["layer=2"])
    assert problem_unsupported(grace, "fact_erasure") is None and "force" in problem_unsupported(grace, "fact_forcing")
    assert problem_unsupported(build_editor("rome", tiny_llama, ["layer=1"]), "fact_forcing") is None


def test_every_family_editor_is_registered_with_family_hparams(tiny_llama):
    from harness.editors import registry
    assert {"grace", "wise", "ike", "encore", "lora"} <= set(registry.names())
    for name, hp in {"grace": ["layer=2"], "wise": ["layer=2"], "ike": [], "lora": []}.items():
        editor = build_editor(name, tiny_llama, hp)      # the llama family files load (no unknown key)
        assert editor.name == name and editor.edited_parameters(tiny_llama) == []     # they write no weight
    encore = build_editor("encore", tiny_llama, ["layers=[1,2]"])
    assert encore.hparams.most_probable_stop and encore.hparams.mom2_update_weight == 1500.0
