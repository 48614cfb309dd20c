"""KnowEdit: each subset loads as EasyEdit reads it (tests/data/knowedit, files written for these tests), malformed
records fail at load time in one line, portability and grouped locality are scored as EasyEdit scores them, and a
file of each subset runs end to end (edit, score, restore) on a tiny model."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.data import DataError
from harness.data.knowedit import SUBSETS, load_knowedit, locality_items, portability_items, sniff_subset
from harness.editors import build_editor
from harness.metrics import counterfact_metrics, score_targets
from harness.metrics.knowedit import grouped_locality, locality_outputs, metric_name, portability, wild_portability
from harness.metrics.wild import case_generations, case_metrics
from harness.models import param_digest

from .conftest import TINY_HPARAMS, make_stats

DATA = Path(__file__).parent / "data" / "knowedit"


def test_each_subset_is_sniffed_and_loaded():
    for subset in SUBSETS:
        cases = load_knowedit(DATA / f"{subset}.json")
        assert len(cases) == 2 and all(c.extra["knowedit_subset"] == subset for c in cases)
        assert all(c.source == f"knowedit-{subset}" for c in cases)
        assert sniff_subset(json.loads((DATA / f"{subset}.json").read_text())[0]) == subset


def test_field_mapping_follows_easyedit():
    zsre = load_knowedit(DATA / "zsre.json")[0]
    assert (zsre.subject, zsre.rewrite_prompt, zsre.target_new, zsre.target_true) == (
        "Toronto", "Which country is Toronto located in?", "Italy", "Canada")
    assert zsre.paraphrase_prompts == ("In which country does Toronto lie?",)
    port = portability_items(zsre)
    assert port["Reasoning"] == [("The currency of the country Toronto is located in is", ["euro", "EUR"])]
    assert port["Logical_Generalization"][0][1] == ["no", "false"]          # nested aliases flattened, first scored

    recent = load_knowedit(DATA / "recent.json")
    assert recent[0].target_true is None                                     # WikiData_recent: no ground truth
    # the empty answer is skipped as EasyEdit skips it; the other item of the group stays
    assert locality_items(recent[0]) == {"Relation_Specificity": [("The field of work of Leo Arons is", "physics")]}
    assert recent[1].locality == () and locality_items(recent[1]) == {}

    cf = load_knowedit(DATA / "counterfact.json")[0]
    assert set(locality_items(cf)) == {"Relation_Specificity", "Forgetfulness"}   # groups kept by name
    assert cf.locality == (("The name of the mayor of Toronto is", "Olivia Chow"),
                           ("The name of the country of Toronto, which is not Italy, is", "Canada"))

    bio = load_knowedit(DATA / "wikibio.json")
    assert bio[0].subject == "ada lovelace" and bio[0].target_new.startswith("She is chiefly known")
    assert bio[0].rewrite_prompt.startswith("This is a Wikipedia passage about ada lovelace.")
    assert bio[1].subject == "Toronto"            # "toronto" matched case-insensitively, the prompt's spelling kept
    assert bio[1].rewrite_prompt == json.loads((DATA / "wikibio.json").read_text())[1]["text"]


def _write(tmp_path, records) -> Path:
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(records))
    return p


GOOD = {"subject": "Toronto", "prompt": "The country of Toronto is", "target_new": "Italy", "ground_truth": "Canada",
        "locality": {"Relation_Specificity": [{"prompt": "The mayor of Toronto is", "ground_truth": "Olivia Chow"}]}}


@pytest.mark.parametrize("change, field", [
    ({"locality": None}, "locality"),
    ({"locality": ["x"]}, "locality"),
    ({"locality": {"Relation_Specificity": [{"prompt": "p"}]}}, "locality.Relation_Specificity[0]"),
    ({"locality": {"Forgetfulness": [{"prompt": "", "ground_truth": "a"}]}}, "locality.Forgetfulness[0].prompt"),
    ({"portability": {"Reasoning": [{"prompt": "p", "ground_truth": {"a": 1}}]}},
     "portability.Reasoning[0].ground_truth"),
    ({"subject": "Vancouver"}, "subject"),
    ({"target_new": ""}, "target_new"),
    ({"prompt": 3}, "prompt"),
])
def test_malformed_record_fails_at_load_in_one_line(tmp_path, change, field):
    rec = {**GOOD, **change}
    rec = {k: v for k, v in rec.items() if v is not None}
    with pytest.raises(DataError) as err:
        load_knowedit(_write(tmp_path, [GOOD, rec]))
    msg = str(err.value)
    assert "\n" not in msg and "bad.json record 1" in msg and f"'{field}'" in msg and "--skip-invalid" in msg
    assert len(load_knowedit(_write(tmp_path, [GOOD, rec]), skip_invalid=True)) == 1


def test_file_level_errors(tmp_path):
    with pytest.raises(DataError, match="not a KnowEdit record"):
        load_knowedit(_write(tmp_path, [{"src": "q", "alt": "a"}]))
    with pytest.raises(DataError, match="wikibio"):
        load_knowedit(DATA / "zsre.json", subset="bio")
    with pytest.raises(DataError, match="'labels'"):
        load_knowedit(_write(tmp_path, [{"text": "about Toronto", "concept": "Toronto", "labels": [], "locality": {}}]))
    with pytest.raises(DataError, match="no records"):
        load_knowedit(_write(tmp_path, []))


def test_portability_and_locality_scores_are_easyedit_definitions(tiny_llama):
    lm = tiny_llama
    case = load_knowedit(DATA / "zsre.json")[0]
    port = portability(lm.model, lm.tokenizer, case)
    groups = portability_items(case)
    for g, items in groups.items():
        accs = [s.token_accuracy for s in score_targets(lm.model, lm.tokenizer, [p for p, _ in items],
                                                        [a[0] for _, a in items])]
        assert port[metric_name("portability", g)] == pytest.approx(sum(accs) / len(accs))
    assert port["portability"] == pytest.approx(sum(port[metric_name("portability", g)] for g in groups) / 3)
    assert metric_name("portability", "Subject_Aliasing") == "portability_subject_aliasing"
    out = locality_outputs(lm.model, lm.tokenizer, case)
    assert grouped_locality(out, out) == {"locality_relation_specificity": 1.0, "knowedit_locality": 1.0}
    flipped = {g: [([t + 1 for t in a], gold) for a, gold in v] for g, v in out.items()}
    assert grouped_locality(out, flipped)["knowedit_locality"] == 0.0
    assert "wild_portability" in wild_portability(lm.model, lm.tokenizer, case, max_new_tokens=4)


@pytest.mark.parametrize("subset", SUBSETS)
def test_each_subset_runs_end_to_end(subset, tiny_llama, tmp_path):
    lm = tiny_llama
    case = load_knowedit(DATA / f"{subset}.json")[0]
    rome = build_editor("rome", lm, TINY_HPARAMS["rome"], stats=make_stats(lm, tmp_path))
    before = param_digest(lm.model)
    loc_pre = locality_outputs(lm.model, lm.tokenizer, case)
    wild_pre = case_generations(lm.model, lm.tokenizer, case, max_new_tokens=4)
    edit = rome.apply(lm, [case])
    try:
        assert param_digest(lm.model) != before
        metrics = {**portability(lm.model, lm.tokenizer, case),
                   **grouped_locality(loc_pre, locality_outputs(lm.model, lm.tokenizer, case)),
                   **case_metrics(case, case_generations(lm.model, lm.tokenizer, case, max_new_tokens=4), wild_pre)}
        if case.target_true is not None:
            metrics.update(counterfact_metrics(lm.model, lm.tokenizer, case))
    finally:
        edit.restore()
    assert param_digest(lm.model) == before
    assert 0.0 <= metrics["knowedit_locality"] <= 1.0 and metrics["wild_locality"] is not None
    assert ("portability" in metrics) == (subset != "wikibio")
    assert ("efficacy_success" in metrics) == (subset in ("zsre", "counterfact"))
