"""Unit tests for harness.data: loaders, format sniffing, error messages, built-in sets and real data."""
from __future__ import annotations

import json
import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from harness.data import (DataError, EditCase, SkippedRecordsWarning, default_ppl_corpus, default_stats_corpus,
                          load_cases, load_counterfact_rome, load_easyedit, load_hardedit, load_texts, load_zsre,
                          resolve_data_dir, save_easyedit)
from harness.data.corpus import split_paragraphs

REPO = Path(__file__).resolve().parents[1]


def _real_data_dir() -> Path | None:
    for cand in (os.environ.get("HARNESS_DATA_DIR"), REPO.parent / "shared" / "data"):
        if cand and (Path(cand) / "counterfact").is_dir():
            return Path(cand)
    return None


REAL = _real_data_dir()
needs_real = pytest.mark.skipif(REAL is None, reason="real data dir not found (set HARNESS_DATA_DIR)")


@pytest.fixture(autouse=True)
def _no_env_data_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests control the data dir explicitly."""
    monkeypatch.delenv("HARNESS_DATA_DIR", raising=False)


def write(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def rome_record(case_id: int = 7, **rewrite: Any) -> dict[str, Any]:
    rr = {"prompt": "{} is located in", "relation_id": "P30", "subject": "Angola",
          "target_new": {"str": " Antarctica ", "id": "Q51"}, "target_true": {"str": "Africa", "id": "Q15"}}
    rr.update(rewrite)
    return {"case_id": case_id, "pararel_idx": 5, "requested_rewrite": rr,
            "paraphrase_prompts": ["Angola belongs to the continent of"],
            "neighborhood_prompts": ["Ghana is in", "Kenya is in"],
            "attribute_prompts": ["Ross Island is located in"],
            "generation_prompts": ["People around Angola speak"]}


def easyedit_record(**kw: Any) -> dict[str, Any]:
    rec = {"case_id": 0, "prompt": "The mother tongue of Danielle Darrieux is", "target_new": "English",
           "subject": "Danielle Darrieux", "ground_truth": "French",
           "rephrase_prompt": "Where Danielle Darrieux is from, people speak the language of",
           "locality_prompt": "Michel Rocard is a native speaker of", "locality_ground_truth": "French"}
    rec.update(kw)
    return rec


def zsre_record(**kw: Any) -> dict[str, Any]:
    rec = {"subject": "UniFirst", "src": "What is the product made by UniFirst?", "pred": "uniform",
           "rephrase": "What will be the product of UniFirst?", "alt": " unmanned aircraft", "answers": ["uniform"],
           "loc": "nq question: who plays the cat in the hat movie", "loc_ans": "Mike Myers", "cond": "x"}
    rec.update(kw)
    return rec


def assert_one_line(err: DataError, *parts: str) -> None:
    msg = str(err)
    assert "\n" not in msg
    for part in parts:
        assert part in msg, (part, msg)


# ------------------------------------------------------------------------------------------------- ROME

def test_load_counterfact_rome(tmp_path: Path) -> None:
    path = write(tmp_path / "cf.json", [rome_record(7), rome_record(8, subject="Ghana")])
    cases = load_counterfact_rome(path)
    assert len(cases) == 2
    c = cases[0]
    assert isinstance(c, EditCase)
    assert (c.case_id, c.subject, c.prompt, c.target_new, c.target_true) == (
        "7", "Angola", "{} is located in", "Antarctica", "Africa")
    assert c.rewrite_prompt == "Angola is located in"
    assert c.relation_id == "P30" and c.source == "counterfact"
    assert c.neighborhood_prompts == ("Ghana is in", "Kenya is in")
    assert c.paraphrase_prompts and c.attribute_prompts and c.generation_prompts
    assert c.extra["pararel_idx"] == 5 and c.extra["target_new_id"] == "Q51"
    assert load_counterfact_rome(path, limit=1) == cases[:1]


@pytest.mark.parametrize("rewrite, field", [
    ({"subject": None}, "requested_rewrite.subject"),
    ({"prompt": "Angola is located in"}, "requested_rewrite.prompt"),
    ({"target_new": {"str": "  "}}, "requested_rewrite.target_new.str"),
    ({"target_new": {}}, "requested_rewrite.target_new.str"),
])
def test_rome_malformed_names_file_record_field(tmp_path: Path, rewrite: dict, field: str) -> None:
    bad = rome_record(3648)
    for k, v in rewrite.items():
        if v is None:
            del bad["requested_rewrite"][k]
        else:
            bad["requested_rewrite"][k] = v
    path = write(tmp_path / "counterfact.json", [rome_record(1), bad])
    with pytest.raises(DataError) as e:
        load_counterfact_rome(path)
    assert_one_line(e.value, "counterfact.json", "record 1", "case_id 3648", f"'{field}'", "--skip-invalid")
    with pytest.warns(SkippedRecordsWarning, match="counterfact.json: skipped 1 invalid record"):
        assert [c.case_id for c in load_counterfact_rome(path, skip_invalid=True)] == ["1"]


def test_rome_missing_requested_rewrite(tmp_path: Path) -> None:
    path = write(tmp_path / "cf.json", [{"case_id": 1}])
    with pytest.raises(DataError, match=r"cf.json record 0 \(case_id 1\): field 'requested_rewrite' is missing"):
        load_counterfact_rome(path)


def test_rome_bad_list_field(tmp_path: Path) -> None:
    rec = rome_record(2)
    rec["neighborhood_prompts"] = [1, 2]
    with pytest.raises(DataError, match="'neighborhood_prompts'"):
        load_counterfact_rome(write(tmp_path / "cf.json", [rec]))


@pytest.mark.parametrize("content, needle", [
    ("{not json", "not valid JSON"),
    ('{"a": 1}', "expected a JSON list"),
    ('"text"', "expected a JSON list"),
])
def test_non_json_or_non_list_file(tmp_path: Path, content: str, needle: str) -> None:
    path = tmp_path / "broken.json"
    path.write_text(content)
    for loader in (load_counterfact_rome, load_easyedit, load_zsre, load_cases):
        with pytest.raises(DataError) as e:
            loader(str(path))
        assert_one_line(e.value, "broken.json", needle)


def test_non_object_record(tmp_path: Path) -> None:
    path = write(tmp_path / "cf.json", [rome_record(1), "oops"])
    with pytest.raises(DataError, match="cf.json record 1: field '<record>'"):
        load_counterfact_rome(path)
    with pytest.warns(SkippedRecordsWarning):
        assert len(load_counterfact_rome(path, skip_invalid=True)) == 1


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="file not found"):
        load_counterfact_rome(tmp_path / "nope.json")
    with pytest.raises(DataError, match="file not found"):
        load_cases(str(tmp_path / "nope.json"))


# --------------------------------------------------------------------------------------------- EasyEdit

def test_load_easyedit_counterfact_style(tmp_path: Path) -> None:
    cases = load_easyedit(write(tmp_path / "ee.json", [easyedit_record()]))
    c = cases[0]
    assert c.prompt == "The mother tongue of {} is"
    assert c.rewrite_prompt == "The mother tongue of Danielle Darrieux is"
    assert (c.target_new, c.target_true, c.source) == ("English", "French", "easyedit")
    assert c.paraphrase_prompts == ("Where Danielle Darrieux is from, people speak the language of",)
    # locality answer == ground truth: a CounterFact neighbourhood prompt
    assert c.neighborhood_prompts == ("Michel Rocard is a native speaker of",) and c.locality == ()


def test_load_easyedit_locality_lists_and_knowedit(tmp_path: Path) -> None:
    rec = easyedit_record(
        ground_truth=["French", "francais"], rephrase_prompt=["p1 Danielle Darrieux", "p2"],
        locality_prompt="Who wrote Hamlet?", locality_ground_truth="Shakespeare",
        locality={"Relation_Specificity": [{"prompt": "The capital of Peru is", "ground_truth": ["Lima"]},
                                           {"prompt": "2+2=", "ground_truth": [["4", "four"]]}]},
        portability={"Reasoning": [{"prompt": "q", "ground_truth": "a"}]}, extra_key=1)
    del rec["case_id"]
    c = load_easyedit(write(tmp_path / "ke.json", [rec]))[0]
    assert c.case_id == "0" and c.target_true == "French"
    assert c.paraphrase_prompts == ("p1 Danielle Darrieux", "p2")
    assert c.neighborhood_prompts == ()
    assert c.locality == (("Who wrote Hamlet?", "Shakespeare"), ("The capital of Peru is", "Lima"), ("2+2=", "4"))
    assert c.extra["portability"] == rec["portability"] and c.extra["extra_key"] == 1


def test_easyedit_missing_ground_truth_and_braces(tmp_path: Path) -> None:
    rec = easyedit_record(prompt="In {set} notation, Danielle Darrieux is", locality_prompt=None,
                          prompt_template="{bad}")  # an unusable template falls back to the subject search
    del rec["ground_truth"]
    c = load_easyedit(write(tmp_path / "ee.json", [rec]))[0]
    assert c.target_true is None
    assert c.prompt == "In {{set}} notation, {} is"
    assert c.rewrite_prompt == "In {set} notation, Danielle Darrieux is"


def test_easyedit_subject_not_in_prompt(tmp_path: Path) -> None:
    path = write(tmp_path / "ee.json", [easyedit_record(), easyedit_record(case_id=12, subject="Someone Else")])
    with pytest.raises(DataError) as e:
        load_easyedit(path)
    assert_one_line(e.value, "ee.json", "record 1", "case_id 12", "'subject'", "'prompt'")
    with pytest.warns(SkippedRecordsWarning):
        assert len(load_easyedit(path, skip_invalid=True)) == 1


@pytest.mark.parametrize("drop", ["prompt", "subject", "target_new"])
def test_easyedit_missing_field(tmp_path: Path, drop: str) -> None:
    rec = easyedit_record(case_id=5)
    del rec[drop]
    with pytest.raises(DataError) as e:
        load_easyedit(write(tmp_path / "ee.json", [rec]))
    assert_one_line(e.value, "ee.json", "record 0 (case_id 5)", f"field '{drop}' is missing")


def test_hardedit_alias(tmp_path: Path) -> None:
    cases = load_hardedit(write(tmp_path / "hard.json", [easyedit_record()]))
    assert cases[0].source == "hardedit"


def test_save_easyedit_round_trip(tmp_path: Path) -> None:
    cases = load_cases("builtin") + load_cases("builtin-hard")
    zsre = load_zsre(write(tmp_path / "z.json", [zsre_record(), zsre_record(answers=[])]))
    tricky = EditCase(case_id="t1", subject="Paris", prompt="Paris Hilton said {} is in {{curly}}", target_new="Rome",
                      paraphrase_prompts=("one",), locality=(("a?", "b"),), extra={"hard": True})
    everything = cases + zsre + [tricky]
    path = save_easyedit(everything, tmp_path / "out" / "hard.json")
    back = load_easyedit(path)
    assert back == [replace(c, source="easyedit") for c in everything]
    assert back[-1].extra == {"hard": True}
    records = json.loads(path.read_text())
    assert records[0]["prompt"] == cases[0].rewrite_prompt and records[0]["ground_truth"] == cases[0].target_true
    assert load_hardedit(path)[0].source == "hardedit"


# ------------------------------------------------------------------------------------------------ zsRE

def test_load_zsre(tmp_path: Path) -> None:
    c = load_zsre(write(tmp_path / "z.json", [zsre_record()]))[0]
    assert c.prompt == "What is the product made by {}?"
    assert c.rewrite_prompt == "What is the product made by UniFirst?"
    assert (c.case_id, c.target_new, c.target_true, c.source) == ("0", "unmanned aircraft", "uniform", "zsre")
    assert c.paraphrase_prompts == ("What will be the product of UniFirst?",)
    assert c.locality == (("nq question: who plays the cat in the hat movie", "Mike Myers"),)
    assert c.extra == {"pred": "uniform", "cond": "x"}


def test_zsre_empty_alt_and_subject(tmp_path: Path) -> None:
    path = write(tmp_path / "zsre.json", [zsre_record(), zsre_record(alt=""), zsre_record(subject="Nobody")])
    with pytest.raises(DataError) as e:
        load_zsre(path)
    assert_one_line(e.value, "zsre.json", "record 1", "field 'alt'", "--skip-invalid")
    with pytest.warns(SkippedRecordsWarning, match="skipped 2 invalid"):
        assert len(load_zsre(path, skip_invalid=True)) == 1
    with pytest.raises(DataError) as e:
        load_zsre(write(tmp_path / "z2.json", [zsre_record(subject="Nobody")]))
    assert_one_line(e.value, "z2.json", "record 0", "'subject'", "'src'")


# ------------------------------------------------------------------------------------------ load_cases

def test_sniffing(tmp_path: Path) -> None:
    assert load_cases(str(write(tmp_path / "a.json", [rome_record()])))[0].source == "counterfact"
    assert load_cases(str(write(tmp_path / "b.json", [zsre_record()])))[0].source == "zsre"
    assert load_cases(str(write(tmp_path / "c.json", [easyedit_record()])))[0].source == "easyedit"
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps(zsre_record()) for _ in range(3)) + "\n")
    assert len(load_cases(str(jsonl), limit=2)) == 2
    with pytest.raises(DataError, match="unrecognised edit format.*keys: a, b"):
        load_cases(str(write(tmp_path / "e.json", [{"a": 1, "b": 2}])))
    with pytest.raises(DataError, match="no records"):
        load_cases(str(write(tmp_path / "f.json", [])))


def test_unknown_spec_and_missing_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DataError) as e:
        load_cases("nonsense")
    assert_one_line(e.value, "nonsense", "builtin", "builtin-hard", "counterfact", "zsre", "hf:")
    with pytest.raises(DataError) as e:
        load_cases("counterfact")
    assert_one_line(e.value, "dataset 'counterfact' needs a data dir", "--data-dir", "HARNESS_DATA_DIR",
                    "counterfact/counterfact_rome_sample500.json")
    with pytest.raises(DataError, match="not found"):
        load_cases("zsre", data_dir=tmp_path)
    (tmp_path / "zsre").mkdir()
    write(tmp_path / "zsre" / "zsre_mend_train_1k.json", [zsre_record()])
    monkeypatch.setenv("HARNESS_DATA_DIR", str(tmp_path))
    assert resolve_data_dir() == tmp_path and resolve_data_dir("/x") == Path("/x")
    assert len(load_cases("zsre")) == 1


def test_hf_spec_error_is_one_line(monkeypatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)            # as if the package were not installed
    with pytest.raises(DataError) as e:
        load_cases("hf:owner/name:train")
    assert_one_line(e.value, "hf:owner/name:train", "pip install datasets")


def test_hf_spec_offline_error_is_one_line(monkeypatch) -> None:
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError) as e:
        load_cases("hf:no-such-owner/no-such-dataset:train")
    assert_one_line(e.value, "hf:no-such-owner/no-such-dataset:train", "cannot load from the Hugging Face hub")


def test_limit_validation() -> None:
    with pytest.raises(DataError, match="limit"):
        load_cases("builtin", limit=-1)
    assert load_cases("builtin", limit=0) == []


# ------------------------------------------------------------------------------------------------ builtin

@pytest.mark.parametrize("spec, n", [("builtin", 40), ("builtin-hard", 24)])
def test_builtin_sets(spec: str, n: int) -> None:
    cases = load_cases(spec)
    assert len(cases) == n and len({c.case_id for c in cases}) == n
    assert all(c.source == spec for c in cases)
    for c in cases:
        assert c.prompt.count("{}") == 1 and c.prompt == c.prompt.strip()
        assert c.target_true and c.target_new != c.target_true
        assert 1 <= len(c.target_new.split()) <= 2 and 1 <= len(c.target_true.split()) <= 2
        assert (len(c.paraphrase_prompts), len(c.neighborhood_prompts), len(c.attribute_prompts),
                len(c.generation_prompts)) == (2, 5, 3, 2)
        for p in c.paraphrase_prompts + c.generation_prompts:
            assert c.subject in p
        for p in c.paraphrase_prompts + c.neighborhood_prompts + c.attribute_prompts + c.generation_prompts:
            assert p == p.strip() and "{" not in p
        for p in c.neighborhood_prompts + c.attribute_prompts:
            assert not re.search(rf"\b{re.escape(c.subject)}\b", p)
    if spec == "builtin":
        assert len({c.relation_id for c in cases}) >= 10
    else:
        assert all(c.prompt.startswith("{}") and c.extra.get("hard") is True and c.extra.get("note") for c in cases)


def test_builtin_files_small() -> None:
    builtin = REPO / "harness" / "data" / "builtin"
    for name in ("edits.json", "hard_edits.json", "passages.json"):
        assert (builtin / name).stat().st_size < 200_000


def test_hard_subjects_single_token() -> None:
    transformers = pytest.importorskip("transformers")
    models = Path(os.environ.get("HARNESS_CACHE_DIR") or Path.home() / ".cache" / "knowedit-harness") / "models"
    tok_dirs = sorted(p.parent for p in models.glob("*/tokenizer.json")) if models.is_dir() else []
    if not tok_dirs:
        pytest.skip("SmolLM2 tokenizer not cached yet")
    tok = transformers.AutoTokenizer.from_pretrained(str(tok_dirs[0]))
    for c in load_cases("builtin-hard"):
        ids = tok(c.subject).input_ids
        assert len(ids) == 1, c.subject
        assert tok(c.rewrite_prompt).input_ids[0] == ids[0], c.subject


# ------------------------------------------------------------------------------------------------- corpus

def test_builtin_passages() -> None:
    texts = load_texts("builtin")
    assert len(texts) == 60
    assert all(60 <= len(t.split()) <= 150 for t in texts)
    assert load_texts("builtin", limit=5) == texts[:5]


def test_text_files(tmp_path: Path) -> None:
    txt = tmp_path / "c.txt"
    txt.write_text(" = Title = \r\n\r\n First para\r\nline two . \r\n\r\n\r\n = = Sub = = \r\n\r\n Second \r\n")
    assert load_texts(str(txt)) == ["First para\nline two .", "Second"]
    assert split_paragraphs("a\n \nb") == ["a", "b"]
    assert load_texts(str(write(tmp_path / "s.json", ["x", " y", ""]))) == ["x", " y"]
    assert load_texts(str(write(tmp_path / "d.json", [{"Text": " A"}, {"text": "B"}]))) == [" A", "B"]
    jl = tmp_path / "e.jsonl"
    jl.write_text('{"text": "one"}\n{"text": "two"}\n')
    assert load_texts(str(jl), limit=1) == ["one"]
    with pytest.raises(DataError, match=r"bad.json record 1: field 'Text'"):
        load_texts(str(write(tmp_path / "bad.json", [{"Text": "ok"}, {"body": "no"}])))
    with pytest.raises(DataError, match="file not found"):
        load_texts(str(tmp_path / "missing.txt"))
    with pytest.raises(DataError, match="unknown corpus 'nope'.*me-ppl-50"):
        load_texts("nope")
    with pytest.raises(DataError, match="corpus 'wikitext' needs a data dir"):
        load_texts("wikitext")


def test_default_corpora(tmp_path: Path) -> None:
    assert default_ppl_corpus(None) == "builtin-sentences" and default_stats_corpus(tmp_path) == "model-samples"
    (tmp_path / "collapse").mkdir()
    write(tmp_path / "collapse" / "ME-PPL_50.json", [{"Corpus": "x", "Text": "t"}])
    assert default_ppl_corpus(tmp_path) == "me-ppl-50"
    assert load_texts("me-ppl-50", data_dir=tmp_path) == ["t"]


# ---------------------------------------------------------------------------------------------- real data

@needs_real
def test_real_counterfact() -> None:
    cases = load_cases("counterfact", data_dir=REAL)
    assert len(cases) == 500
    assert all(len(c.neighborhood_prompts) == 10 and c.prompt.count("{}") == 1 for c in cases)
    assert cases[0].case_id == "20952" and cases[0].target_true == "Africa"


@needs_real
def test_real_counterfact_easyedit() -> None:
    cases = load_cases("counterfact-easyedit", data_dir=REAL, limit=200)
    assert len(cases) == 200
    assert all(len(c.neighborhood_prompts) == 1 and not c.locality for c in cases)


@needs_real
def test_real_zsre() -> None:
    with pytest.raises(DataError, match="field 'alt'"):
        load_cases("zsre", data_dir=REAL)
    with pytest.warns(SkippedRecordsWarning, match="zsre_mend_train_1k.json: skipped 2 invalid"):
        cases = load_cases("zsre", data_dir=REAL, skip_invalid=True)
    assert len(cases.skipped) == 2 and cases.skipped[0].index == 534 and {s.field for s in cases.skipped} == {"alt"}
    assert len(cases) == 998
    assert all(c.target_new == c.target_new.strip() and c.target_new for c in cases)
    assert all(c.rewrite_prompt.endswith("?") and len(c.locality) == 1 for c in cases[:50])


@needs_real
def test_real_corpora() -> None:
    me = load_texts("me-ppl-50", data_dir=REAL)
    assert len(me) == 50 and me[0].startswith(" ")
    wiki = load_texts("wikitext", data_dir=REAL)
    assert len(wiki) > 1000 and not any(p.startswith("=") for p in wiki)
    assert default_ppl_corpus(REAL) == "me-ppl-50" and default_stats_corpus(REAL) == "wikitext"


def test_builtin_sentences_are_short_general_texts():
    texts = load_texts("builtin-sentences")
    assert len(texts) >= 100
    words = [len(t.split()) for t in texts[:50]]
    assert min(words) >= 6 and 10 <= sum(words) / 50 <= 35      # ME-PPL's texts average 22.6 words
