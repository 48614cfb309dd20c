"""QAEdit and zsRE in QA form: field mapping, the footnote marker, locality pairs, one-line errors, and (with the
real data dir) the 1k QAEdit sample and the zsRE slice."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from harness.data import DataError
from harness.data import load_cases
from harness.data.qaedit import load_qaedit, load_zsre_qa

REPO = Path(__file__).resolve().parents[1]
REAL = next((Path(c) for c in (os.environ.get("HARNESS_DATA_DIR"), REPO.parent / "shared" / "data")
             if c and (Path(c) / "collapse" / "QAEdit_inter_1k.json").is_file()), None)
needs_real = pytest.mark.skipif(REAL is None, reason="real data dir not found (set HARNESS_DATA_DIR)")

RECORD = {"id": 7, "source": "TQA", "prompt": "which country is toronto in?", "target": "Canada *",
          "subject": "toronto", "rephrase": "Toronto is a city in which country?",
          "locality": [{"loc": "who wrote hamlet", "loc_ans": "Shakespeare"},
                       {"loc": "what is the capital of france", "loc_ans": " Paris "}]}


def _write(tmp_path, records, name="qa.json") -> Path:
    p = tmp_path / name
    p.write_text(json.dumps(records))
    return p


def test_qaedit_mapping(tmp_path):
    (case,) = load_qaedit(_write(tmp_path, [RECORD]))
    assert case.case_id == "7" and case.source == "qaedit"
    assert case.rewrite_prompt == "which country is toronto in?" and case.prompt == "which country is {} in?"
    assert case.target_new == "Canada" and case.extra["raw_target"] == "Canada *"
    assert case.target_true is None                                  # QAEdit edits in true facts: no old answer
    assert case.paraphrase_prompts == ("Toronto is a city in which country?",)
    assert case.locality == (("who wrote hamlet", "Shakespeare"), ("what is the capital of france", "Paris"))
    assert case.extra["locality_first"] == ["who wrote hamlet", "Shakespeare"]
    assert case.extra["qa_source"] == "TQA"


@pytest.mark.parametrize("change, field", [
    ({"target": ""}, "target"),
    ({"target": " *"}, "target"),
    ({"subject": "vancouver"}, "subject"),
    ({"locality": []}, "locality"),
    ({"locality": [{"loc": "q"}]}, "loc_ans"),
    ({"rephrase": None}, "rephrase"),
])
def test_qaedit_bad_record_is_one_line(tmp_path, change, field):
    bad = {k: v for k, v in {**RECORD, **change}.items() if v is not None}
    with pytest.raises(DataError) as err:
        load_qaedit(_write(tmp_path, [RECORD, bad]))
    msg = str(err.value)
    assert "\n" not in msg and "qa.json record 1" in msg and f"'{field}'" in msg
    assert len(load_qaedit(_write(tmp_path, [RECORD, bad]), skip_invalid=True)) == 1


def test_zsre_records_are_pointed_elsewhere(tmp_path):
    with pytest.raises(DataError, match="zsRE records"):
        load_qaedit(_write(tmp_path, [{"src": "q", "alt": "a", "subject": "q"}]))


def test_zsre_qa_form(tmp_path):
    rec = {"subject": "UniFirst", "src": "What is the product made by UniFirst?", "alt": " unmanned aircraft",
           "answers": ["uniform", "uniforms"], "rephrase": "What will be the product of UniFirst?",
           "loc": "nq question: who wrote hamlet", "loc_ans": "Shakespeare"}
    (case,) = load_zsre_qa(_write(tmp_path, [rec]))
    assert case.source == "zsre-qa" and case.rewrite_prompt == rec["src"] and case.target_new == "unmanned aircraft"
    assert case.target_true == "uniform" and case.extra["answers"] == ["uniform", "uniforms"]
    assert case.locality == (("nq question: who wrote hamlet", "Shakespeare"),)     # prefix kept, as in WILD


def test_named_sets_and_errors_name_the_fix(tmp_path, monkeypatch):
    monkeypatch.delenv("HARNESS_DATA_DIR", raising=False)
    with pytest.raises(DataError, match="--data-dir"):
        load_cases("qaedit")
    with pytest.raises(DataError, match="QAEdit_inter_1k.json not found"):
        load_cases("qaedit", data_dir=tmp_path)
    (tmp_path / "collapse").mkdir()
    _write(tmp_path / "collapse", [RECORD], "QAEdit_inter_1k.json")
    assert load_cases("qaedit", data_dir=tmp_path)[0].source == "qaedit"


@needs_real
def test_real_qaedit_and_zsre_load():
    cases = load_cases("qaedit", data_dir=REAL, limit=None)
    assert len(cases) == 1000 and all(len(c.locality) == 5 and c.paraphrase_prompts for c in cases)
    assert sum("raw_target" in c.extra for c in cases) == 1                 # "Wilt Chamberlain *"
    assert {c.extra["qa_source"] for c in cases} == {"NQ", "TQA", "SQA"}
    zsre = load_cases("zsre-qa", data_dir=REAL, limit=None, skip_invalid=True)
    assert len(zsre) == 998 and all(c.extra["answers"] for c in zsre)      # 2 records have an empty 'alt'
