"""Issue 28's data and verdict claims: case ids are unique in every loaded format (a stream of 3 edits with two ids
alike was scored over 2); a QAEdit or KnowEdit file given by path is sniffed (it failed "unrecognised edit format");
a single edit without a true target still checks that the edit took (teacher-forced rewrite_acc); a prompt longer
than the model's context is refused when the cases load, before any editor sees it; the layer sweep of a model that
knows no fact reports None with a reason, not NaN with NumPy warnings; the editing-problems suite says why it has no
case instead of "got empty parameter set"."""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest

from harness.data import DataError, SkippedRecordsWarning, load_cases
from harness.problems import SweepResult
from harness.protocols.base import Measurement
from harness.session import HarnessSession
from harness.thresholds import Thresholds
from harness.tracing import localization_r2

from .test_data import easyedit_record, rome_record, zsre_record
from .test_session import tiny_options

pytest_plugins = ["pytester"]
REPO = Path(__file__).resolve().parents[1]
KNOWEDIT = REPO / "tests" / "data" / "knowedit"
REAL_QAEDIT = REPO.parent / "shared" / "data" / "collapse" / "QAEdit_inter_1k.json"


def _write(path: Path, records) -> Path:
    path.write_text(json.dumps(records))
    return path


def qaedit_record(i: int, source: str = "NQ", **kw) -> dict:
    rec = {"id": i, "source": source, "prompt": f"which country is toronto {i} in?", "target": "Canada",
           "subject": f"toronto {i}", "rephrase": f"Toronto {i} is a city in which country?",
           "locality": [{"loc": "who wrote hamlet", "loc_ans": "Shakespeare"}]}
    rec.update(kw)
    return rec


def _knowedit_records() -> list[dict]:
    return json.loads((KNOWEDIT / "counterfact.json").read_text())


# --- duplicate case ids -------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec_of, records", [
    (str, [rome_record(case_id=1), rome_record(case_id=2), rome_record(case_id=1)]),
    (str, [easyedit_record(case_id=5), easyedit_record(case_id=6), easyedit_record(case_id=5)]),
    (str, [zsre_record(case_id="a"), zsre_record(case_id="b"), zsre_record(case_id="a")]),
    (lambda p: f"knowedit:{p}", [{**r, "id": 9} for r in _knowedit_records()] + [{**_knowedit_records()[0],
                                                                                  "id": 3}]),
    (str, [qaedit_record(1), qaedit_record(2), qaedit_record(1, prompt="who wrote toronto 1?")]),
])
def test_duplicate_case_ids_are_refused_in_one_line(tmp_path, spec_of, records):
    """Every format: the repeated id and the file are named; --skip-invalid leaves the repeat out."""
    path = _write(tmp_path / "dup.json", records)
    with pytest.raises(DataError) as e:
        load_cases(spec_of(path))
    msg = str(e.value)
    assert "\n" not in msg and "dup.json record" in msg and "repeats the case id" in msg and "--skip-invalid" in msg
    with pytest.warns(SkippedRecordsWarning):
        cases = load_cases(spec_of(path), skip_invalid=True)
    ids = [c.case_id for c in cases]
    assert len(ids) == len(set(ids)) == len(records) - 1 and cases.skipped[0].reason.startswith("dup.json record")


def test_a_stream_of_n_edits_has_n_distinct_cases(tmp_path):
    """The probe: n_edits 3 but final efficacy averaged over 2 ids; the stream now cannot be built from such a file."""
    path = _write(tmp_path / "s.json", [rome_record(case_id=7), rome_record(case_id=8), rome_record(case_id=7)])
    with pytest.raises(DataError, match=r"s.json record 2 \(case_id 7\): field 'case_id' repeats the case id '7' "
                                        r"of record 0"):
        load_cases(str(path), limit=3)


def test_qaedit_ids_counted_per_source_are_named_by_source(tmp_path):
    """QAEdit numbers NQ, TQA and SQA questions separately (its 1k sample has 37 ids twice): the cases are named
    SOURCE-ID, the same whatever --cases is; a repeat within one source is still a duplicate."""
    records = [qaedit_record(1, "NQ"), qaedit_record(2, "TQA"), qaedit_record(1, "TQA")]
    path = _write(tmp_path / "qa.json", records)
    assert [c.case_id for c in load_cases(str(path))] == ["NQ-1", "TQA-2", "TQA-1"]
    assert [c.case_id for c in load_cases(str(path), limit=1)] == ["NQ-1"]
    with pytest.raises(DataError, match="repeats the case id 'TQA-1'"):
        load_cases(str(_write(tmp_path / "qa2.json", records + [qaedit_record(1, "TQA")])))


@pytest.mark.skipif(not REAL_QAEDIT.is_file(), reason="the shared data dir is not here")
def test_the_real_qaedit_sample_has_1000_distinct_cases():
    cases = load_cases(str(REAL_QAEDIT), limit=None)
    assert len(cases) == len({c.case_id for c in cases}) == 1000


# --- sniffing QAEdit and KnowEdit files ---------------------------------------------------------------------
def test_qaedit_file_given_by_path_reads_as_dataset_qaedit(tmp_path):
    """``--dataset PATH/QAEdit_inter_1k.json`` (the file as distributed) gives what ``--dataset qaedit`` gives."""
    (tmp_path / "collapse").mkdir()
    path = _write(tmp_path / "collapse" / "QAEdit_inter_1k.json", [qaedit_record(1), qaedit_record(2, "SQA")])
    by_path, by_name = load_cases(str(path)), load_cases("qaedit", data_dir=tmp_path)
    assert [c.source for c in by_path] == ["qaedit", "qaedit"]
    assert by_path == by_name and [c.extra for c in by_path] == [c.extra for c in by_name]


@pytest.mark.parametrize("subset", ["counterfact", "recent", "wikibio", "zsre"])
def test_knowedit_file_given_by_path_reads_as_knowedit_spec(subset):
    path = KNOWEDIT / f"{subset}.json"
    by_path, by_spec = load_cases(str(path)), load_cases(f"knowedit:{path}")
    assert by_path == by_spec and [c.extra for c in by_path] == [c.extra for c in by_spec]
    assert {c.source for c in by_path} == {f"knowedit-{subset}"}


def test_unrecognised_format_names_the_prefixed_specs(tmp_path):
    with pytest.raises(DataError) as e:
        load_cases(str(_write(tmp_path / "x.json", [{"question": "q", "answer": "a"}])))
    msg = str(e.value)
    assert "\n" not in msg and "x.json: unrecognised edit format" in msg
    assert all(s in msg for s in ("qaedit", "zsre-qa", "knowedit:FILE", "QAEdit", "KnowEdit"))


# --- single edits without a true target ---------------------------------------------------------------------
def test_single_edit_without_target_true_checks_rewrite_acc():
    """QAEdit / KnowEdit recent / WikiBio: no P(new) > P(true) comparison, so the teacher-forced rewrite accuracy
    of the new target says whether the edit took (against --min-efficacy); with a true target ES still decides."""
    t = Thresholds()
    assert t.violations_single_edit(Measurement({"ppl_ratio": 1.1, "efficacy_success": None,
                                                 "rewrite_acc": 0.5})) == [
        "rewrite_acc=0.500 < min_efficacy 1.0 (edit did not take: the new target's tokens are not the top "
        "predictions; the case has no true target to compare P(new) with; --min-efficacy)"]
    assert t.violations_single_edit(Measurement({"ppl_ratio": 1.1, "rewrite_acc": 1.0})) == []
    assert Thresholds(min_efficacy=0.5).violations_single_edit(Measurement({"ppl_ratio": 1.1,
                                                                            "rewrite_acc": 0.5})) == []
    assert t.violations_single_edit(Measurement({"ppl_ratio": 1.1, "efficacy_success": 1.0,
                                                 "rewrite_acc": 0.0})) == []


def test_cases_without_target_true_are_scored_with_rewrite_acc(tiny_llama, tmp_path):
    from harness.metrics.counterfact import counterfact_metrics
    (case,) = load_cases(str(_write(tmp_path / "qa.json", [qaedit_record(1)])))
    m = counterfact_metrics(tiny_llama.model, tiny_llama.tokenizer, case)
    assert case.target_true is None and m.get("efficacy_success") is None and m["rewrite_acc"] is not None
    bad = Thresholds().violations_single_edit(Measurement({"ppl_ratio": 1.0, **m}))
    assert any(b.startswith("rewrite_acc=") for b in bad) == (m["rewrite_acc"] < 1.0)


# --- prompts longer than the model's context ----------------------------------------------------------------
def _long_file(tmp_path: Path) -> Path:
    records = [rome_record(case_id=1), rome_record(case_id=2), rome_record(case_id=3)]
    records[1]["paraphrase_prompts"] = ["the " * 3000 + "Danielle Darrieux speaks"]
    return _write(tmp_path / "long.json", records)


def test_fit_context_names_case_tokens_and_limit(tiny_tokenizer, tmp_path):
    from harness.data.loaders import fit_context
    cases = load_cases(str(_long_file(tmp_path)))
    with pytest.raises(DataError) as e:
        fit_context(cases, tiny_tokenizer, 256, name="long.json")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("long.json: case 2: its paraphrase prompt 'the the")
    assert "more than the model's context of 256" in msg and "--skip-invalid" in msg
    assert int(msg.split(" has ")[1].split(" tokens")[0]) >= 3000
    with pytest.warns(SkippedRecordsWarning, match="left out 1 case"):
        kept = fit_context(cases, tiny_tokenizer, 256, name="long.json", skip_invalid=True)
    assert [c.case_id for c in kept] == ["1", "3"] and kept.skipped[0].record_id == "case_id 2"
    assert fit_context(cases, tiny_tokenizer, None, name="long.json") == cases         # unknown context: kept


def test_session_refuses_a_long_prompt_when_the_cases_load(tiny_model_dir, tmp_path):
    """Checked as the cases load (every suite, the sequential one's stream included), from the model's tokenizer
    and config before its weights are loaded: no editor ever sees the case."""
    h = HarnessSession(tiny_options(tiny_model_dir, tmp_path, dataset=str(_long_file(tmp_path)), n_cases=3))
    with pytest.raises(DataError, match=r"long.json: case 2: .* tokens, more than the model's context of 256"):
        h.cases()
    assert h._lm is None                                             # the weights were not needed
    with pytest.raises(DataError, match="case 2"):
        h.cases(limit=3)                                             # what the sequential suite streams
    skipping = HarnessSession(tiny_options(tiny_model_dir, tmp_path, dataset=str(_long_file(tmp_path)), n_cases=3,
                                           skip_invalid=True))
    with pytest.warns(SkippedRecordsWarning):
        assert [c.case_id for c in skipping.cases()] == ["1", "3"]


# --- the layer sweep and the editing problems on a model that knows no fact -----------------------------------
def test_a_sweep_without_facts_reports_none_with_a_reason_not_nan():
    result = SweepResult([0, 2], 1, [], [], [], {"hidden": [], "mlp": []})
    with warnings.catch_warnings():
        warnings.simplefilter("error")                               # no NumPy "Mean of empty slice"
        m = result.metrics()
    flat = [v for v in m.values() if isinstance(v, float)] + [x for v in m.values() if isinstance(v, list)
                                                              for x in v if isinstance(x, float)]
    assert not any(math.isnan(x) for x in flat)
    assert m["best_edit_success"] is None and m["best_layer"] is None and m["r2_tracing"] is None
    (line,) = Thresholds().violations_layer_sweep(Measurement(m))
    assert line.startswith("best_edit_success undefined (None): no case was swept: the model predicts the true "
                           "answer of none of the dataset's cases") and "nan" not in line


def test_constant_success_has_no_r2():
    r = localization_r2([0, 1, 0, 1], [0.1, 0.2, 0.3, 0.1], [0.0, 0.0, 0.0, 0.0])
    assert r["r2_tracing"] is None and r["r2_layer"] is None and r["n_points"] == 4
    assert localization_r2([], [], [])["r2_both"] is None


def test_editing_problems_suite_says_why_it_has_no_case(pytester, tiny_model_dir):
    result = pytester.runpytest_subprocess(
        str(REPO / "suites" / "test_editing_problems.py"), "--model", str(tiny_model_dir), "--device", "cpu",
        "--editor", "rome", "--report-dir", str(pytester.path / "reports"), "-p", "no:cacheprovider", "-rs")
    assert result.ret == pytest.ExitCode.OK
    result.assert_outcomes(skipped=5)                                # one per problem
    out = result.stdout.str()
    assert "got empty parameter set" not in out
    result.stdout.fnmatch_lines(["SKIPPED * no known cases: the model predicts (top-1) the true answer of none of "
                                 "the * cases of --dataset builtin that have one*use a bigger model*"])
