"""Provenance from the resolvers (issue 28): the session resolves the perplexity corpus, the dataset and the key
statistics' corpus once, keeps what each resolver returned (``HarnessSession.resolved``, ``harness.data.resolved``),
and the run JSON's provenance records exactly that; the sequential resume key and ``harness compare``'s like-for-like
check read the same digests."""
from __future__ import annotations

import json

import pytest

import harness.data.corpus as corpus_module
import harness.plugin as plugin_module
import harness.session as session_module
from harness.data.resolved import Resolved, cases_digest, key_parts, texts_digest
from harness.provenance import sha256_file
from harness.report.compare import differences, setting_notes
from harness.sequential import run_key_parts

from .test_plugin import _run, tiny_model_dir  # noqa: F401  (the fixture)

pytest_plugins = ["pytester"]


@pytest.fixture
def recorded_run(pytester, tiny_model_dir, monkeypatch):  # noqa: F811
    """One in-process single-edit run on the tiny model, with the session it used and every ``load_texts`` call."""
    sessions, calls = [], []
    real = corpus_module.load_texts

    def counting(spec, *args, **kwargs):
        calls.append(spec)
        return real(spec, *args, **kwargs)

    class Recorded(session_module.HarnessSession):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            sessions.append(self)

    monkeypatch.setattr(corpus_module, "load_texts", counting)
    monkeypatch.setattr(session_module, "load_texts", counting)
    monkeypatch.setattr(plugin_module, "HarnessSession", Recorded)
    result = _run(pytester, tiny_model_dir, "--editor", "rome", "--cases", "2", "--stats-corpus", "builtin",
                  "--min-efficacy", "0", "--collapse-ratio", "1e6", in_process=True)
    result.assert_outcomes(passed=2)
    assert len(sessions) == 1
    run = json.loads((pytester.path / "reports" / "latest.json").read_text())
    return run, sessions[0], calls


def _records_are_what_the_session_resolved(recorded_run):
    run, session, _ = recorded_run
    prov, held = run["provenance"], session.resolved
    assert set(held) == {"perplexity", "dataset", "statistics"}
    assert all(isinstance(r, Resolved) for r in held.values())
    corpora = prov["corpora"]
    for name in ("perplexity", "statistics"):      # the record itself, plus what was used of it
        record = json.loads(json.dumps(held[name].record()))
        assert {k: corpora[name][k] for k in record} == record, name
    assert {k: prov["dataset"][k] for k in held["dataset"].record()} == json.loads(
        json.dumps(held["dataset"].record()))

    # the digests are those of what ran: the texts scored, the cases edited, the statistics' cache key
    assert corpora["perplexity"]["content_sha256"] == texts_digest(session.ppl_texts())
    assert corpora["perplexity"]["texts"] == len(session.ppl_texts()) == 8
    assert prov["dataset"]["content_sha256"] == cases_digest(session.cases())
    assert prov["dataset"]["n_cases"] == 2
    assert corpora["statistics"]["content_sha256"] == session.stats.corpus_digest()
    assert corpora["statistics"]["spec"] == "builtin" and corpora["statistics"]["tokens_requested"] == 2000
    assert corpora["statistics"]["sha256"] == sha256_file(corpora["statistics"]["path"]) is not None
    if corpora["perplexity"]["path"] is None:       # generated texts: the content is the digest
        assert corpora["perplexity"]["sha256"] == corpora["perplexity"]["content_sha256"]
    else:
        assert corpora["perplexity"]["sha256"] == sha256_file(corpora["perplexity"]["path"])


def _perplexity_corpus_resolved_once(recorded_run):
    _, session, calls = recorded_run
    assert calls.count(session.ppl_corpus_name()) == 1, calls
    assert calls.count("builtin") <= 1, calls     # the statistics corpus: read once, by LayerStats


def _resume_key_parts_are_the_provenance_digests(recorded_run):
    run, session, _ = recorded_run
    prov = run["provenance"]
    editor = session._editors["rome"]
    parts = run_key_parts(session.lm, editor, session.cases(), batch_size=1, ppl_schedule="every", wild=False,
                          ppl_texts=session.ppl_texts())
    assert parts["ppl_texts"] == prov["corpora"]["perplexity"]["content_sha256"]
    assert parts["stats"]["corpus_sha256"] == prov["corpora"]["statistics"]["content_sha256"]
    assert parts["cases"] == prov["dataset"]["content_sha256"]
    from_records = key_parts({"perplexity": prov["corpora"]["perplexity"],
                              "statistics": prov["corpora"]["statistics"], "dataset": prov["dataset"]})
    assert from_records == {k: parts[k] for k in from_records}
    assert key_parts(session.resolved) == from_records


def test_provenance_from_the_resolvers(recorded_run):
    """One tiny-model run (each step is a claim): provenance records exactly what the session resolved, the
    perplexity corpus is read once, and the resume key's parts are the provenance records' digests."""
    _records_are_what_the_session_resolved(recorded_run)
    _perplexity_corpus_resolved_once(recorded_run)
    _resume_key_parts_are_the_provenance_digests(recorded_run)


def _run_json(ppl: dict, stats: dict) -> dict:
    return {"model": {"name": "m"}, "provenance": {"dataset": {"spec": "builtin"},
                                                   "corpora": {"perplexity": ppl, "statistics": stats}}}


def test_compare_reads_the_record_digests():
    ppl = {"spec": "builtin-sentences", "texts_requested": 8, "sha256": "a" * 64, "content_sha256": "b" * 64}
    stats = {"spec": "builtin", "tokens_requested": 2000, "sha256": "c" * 64, "content_sha256": "d" * 64}
    base = _run_json(ppl, stats)
    assert not any("corpus" in d for d in differences(base, _run_json(dict(ppl), dict(stats))))
    other_texts = _run_json({**ppl, "content_sha256": "e" * 64}, stats)
    assert any(d.startswith("perplexity corpus differs") for d in differences(base, other_texts))
    other_stats = _run_json(ppl, {**stats, "content_sha256": "e" * 64})
    assert any(n.startswith("key statistics corpus differs") for n in setting_notes(base, other_stats))
    # a run recorded before the content digest existed: nothing to compare on it, not a refusal
    older = _run_json({k: v for k, v in ppl.items() if k != "content_sha256"}, stats)
    assert not any("corpus" in d for d in differences(base, older))
