"""Downstream evaluation on tiny random models and tiny fixture files (tests/data/downstream, written for these tests
in the data dir's layout): the local-data loaders, lm-eval on the in-memory model checked against a direct
computation, the session cache of base scores, the correlation, and the suite end to end."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from harness.data import DataError
from harness.downstream import (
    DownstreamEvaluator,
    DownstreamUnavailable,
    StateSeries,
    TaskScore,
    UnknownTaskError,
    downstream_metrics,
    parse_tasks,
    pearson,
    spearman,
    task_info,
    task_names,
)
from harness.downstream import data as ddata
from harness.protocols import Measurement
from harness.thresholds import Thresholds

pytest_plugins = ["pytester"]
DATA = Path(__file__).resolve().parent / "data"
SUITES = Path(__file__).resolve().parents[1] / "suites"
needs_lm_eval = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                                   reason="lm-eval is not installed (pip install -e '.[downstream]')")
ALL = ["arc_challenge", "boolq", "cola", "gsm8k", "hellaswag", "mmlu", "mmlu_chemistry", "mrpc", "nq_open", "piqa",
       "rte", "sst2"]


def test_every_task_has_a_yaml_a_metric_a_chance_level_and_a_loader():
    assert task_names() == ALL
    for t in ALL:
        info = task_info(t)
        assert info["metric"].split(",")[0] in ("acc", "acc_norm", "exact_match")
        assert 0.0 <= info["chance"] <= 0.5
        assert callable(getattr(ddata, t))
    assert parse_tasks("all") == ALL and parse_tasks("piqa, boolq") == ["piqa", "boolq"]
    with pytest.raises(UnknownTaskError, match="unknown downstream task 'boolx'; available: arc_challenge, boolq"):
        parse_tasks("boolq,boolx")


@needs_lm_eval
def test_loaders_read_the_data_dir_layout():
    boolq = ddata.boolq(data_dir=str(DATA))["test"]
    assert [r["label"] for r in boolq] == [0, 1, 0, 1]               # False/True interleaved: prefixes balanced
    piqa = ddata.piqa(data_dir=str(DATA))["test"]
    assert [r["label"] for r in piqa] == [0, 1, 0]                    # joined with the .lst labels
    arc = ddata.arc_challenge(data_dir=str(DATA))["test"]
    assert arc[1]["choices"]["text"][arc[1]["choices"]["label"].index(arc[1]["answerKey"])] == "heat"
    chem = ddata.mmlu_chemistry(data_dir=str(DATA))["test"]
    assert chem[0]["choices"] == ["water", "salt", "iron, pure", "gold"] and chem[1]["answer"] == 1
    assert ddata.nq_open(data_dir=str(DATA))["test"][1]["answer"] == ["William Shakespeare", "Shakespeare"]
    for t in ALL:
        assert len(getattr(ddata, t)(data_dir=str(DATA))["test"]) >= 1


@needs_lm_eval
def test_missing_data_is_one_line_naming_the_file_and_data_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("HARNESS_DATA_DIR", raising=False)
    with pytest.raises(DataError, match=r"boolq_dev_balanced2474.jsonl not found; pass --data-dir") as e:
        ddata.boolq(data_dir=str(tmp_path))
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match="pass --data-dir"):
        ddata.piqa(data_dir=None)
    (tmp_path / "downstream").mkdir()
    (tmp_path / "downstream" / "piqa_valid.jsonl").write_text((DATA / "downstream" / "piqa_valid.jsonl").read_text())
    (tmp_path / "downstream" / "piqa_valid-labels.lst").write_text("0\n1\n")
    with pytest.raises(DataError, match="2 labels for 3 questions"):
        ddata.piqa(data_dir=str(tmp_path))


def test_missing_lm_eval_is_a_clear_skip_reason(tiny_gpt2, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)          # import lm_eval -> ImportError
    with pytest.raises(DownstreamUnavailable, match=r"pip install -e '\.\[downstream\]'"):
        DownstreamEvaluator(tiny_gpt2, data_dir=str(DATA))


def _direct_boolq_accuracy(lm) -> float:
    """BoolQ accuracy computed without lm-eval: log P(" no") vs log P(" yes") after lm-eval's prompt."""
    hits = []
    for doc in ddata.boolq(data_dir=str(DATA))["test"]:
        ctx = lm.tokenizer(f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:").input_ids
        lls = []
        for choice in (" no", " yes"):
            cont = lm.tokenizer(choice, add_special_tokens=False).input_ids
            ids = torch.tensor([ctx + cont])
            with torch.no_grad():
                logp = F.log_softmax(lm.model(ids).logits[0].float(), -1)
            lls.append(sum(float(logp[len(ctx) - 1 + j, c]) for j, c in enumerate(cont)))
        hits.append(float(lls.index(max(lls)) == doc["label"]))
    return sum(hits) / len(hits)


@needs_lm_eval
def test_lm_eval_scores_the_in_memory_model(tiny_gpt2):
    lm = tiny_gpt2
    ev = DownstreamEvaluator(lm, data_dir=str(DATA), batch_size=4)
    scores = ev.evaluate(["boolq", "arc_challenge", "nq_open"], limit=None)
    assert scores["boolq"].n == 4 and scores["arc_challenge"].n == 2 and scores["nq_open"].n == 2
    assert scores["boolq"].value == pytest.approx(_direct_boolq_accuracy(lm))
    assert scores["arc_challenge"].metric == "acc_norm,none" and scores["arc_challenge"].chance == 0.25
    # an in-place weight change is what the same wrapper scores next (edits change weights in place)
    head = lm.model.get_output_embeddings().weight
    saved = head.detach().clone()
    yes = lm.tokenizer(" yes", add_special_tokens=False).input_ids[0]
    try:
        with torch.no_grad():
            head[yes] *= -50.0          # make " yes" unlikely after any context: every answer becomes " no"
        after = ev.evaluate(["boolq"], limit=None)["boolq"]
        assert after.value == pytest.approx(_direct_boolq_accuracy(lm)) == 0.5
    finally:
        with torch.no_grad():
            head.copy_(saved)


def test_base_scores_are_computed_once_per_task_and_limit(tiny_gpt2, monkeypatch):
    ev = DownstreamEvaluator(tiny_gpt2, data_dir=str(DATA))
    calls = []

    def fake(tasks, limit):
        calls.append((tuple(tasks), limit))
        return {t: TaskScore(t, "acc,none", 0.5, 2, 0.5, None) for t in tasks}
    monkeypatch.setattr(ev, "evaluate", fake)
    ev.base(["boolq"], 2)
    ev.base(["boolq", "piqa"], 2)
    ev.base(["boolq"], 2)
    ev.base(["boolq"], 3)
    assert calls == [(("boolq",), 2), (("piqa",), 2), (("boolq",), 3)]


def test_metric_names_and_drop_threshold():
    before = {"boolq": TaskScore("boolq", "acc,none", 0.6, 20, 0.5, None),
              "piqa": TaskScore("piqa", "acc,none", 0.7, 20, 0.5, None)}
    after = {"boolq": TaskScore("boolq", "acc,none", 0.55, 20, 0.5, None),
             "piqa": TaskScore("piqa", "acc,none", 0.5, 20, 0.5, None)}
    m = downstream_metrics(before, after)
    assert m["downstream_boolq_before"] == 0.6 and m["downstream_piqa_after"] == 0.5
    assert m["downstream_piqa_drop"] == pytest.approx(0.2)
    problems = Thresholds(max_accuracy_drop=0.1).violations_downstream(Measurement(m))
    assert len(problems) == 1 and problems[0].startswith("downstream_piqa: accuracy 0.700 -> 0.500 after the edit "
                                                         "(drop 0.200 > max_accuracy_drop 0.1")
    assert Thresholds(max_accuracy_drop=0.25).violations_downstream(Measurement(m)) == []


def test_correlation_over_states(monkeypatch):
    s = StateSeries()
    for n, ppl, acc in [(0, 10.0, 0.60), (1, 12.0, 0.58), (2, 400.0, 0.30), (3, 9e4, 0.25), (4, float("inf"), 0.25)]:
        s.add(n, ppl, {"boolq": acc, "piqa": 0.5})
    c = s.correlations()
    assert c["ppl_downstream_spearman_boolq"] == pytest.approx(-1.0)      # inf state left out; ranks reversed
    assert c["corr_states_boolq"] == 4
    x, y = [10.0, 12.0, 400.0, 9e4], [0.60, 0.58, 0.30, 0.25]
    ref = float(torch.corrcoef(torch.tensor([x, y], dtype=torch.float64))[0, 1])
    assert c["ppl_downstream_pearson_boolq"] == pytest.approx(ref)
    assert -1 < c["logppl_downstream_pearson_boolq"] < c["ppl_downstream_pearson_boolq"] < 0
    assert c["ppl_downstream_spearman_piqa"] is None                       # constant accuracy: undefined
    assert pearson([1, 2], [2, 1]) is None
    assert s.to_table()[2] == {"n_edits": 2, "ppl": 400.0, "boolq": 0.30, "piqa": 0.5}
    with_scipy = (spearman(x, y), pearson(x, y))
    monkeypatch.setitem(sys.modules, "scipy", None)                        # the pandas fallback agrees
    assert (spearman(x, y), pearson(x, y)) == pytest.approx(with_scipy)


@needs_lm_eval
def test_downstream_suite_records_scores_and_correlation(pytester, tiny_model_dir):
    reports = pytester.path / "reports"
    result = pytester.runpytest_subprocess(
        str(SUITES / "test_downstream.py"), "--model", str(tiny_model_dir), "--device", "cpu",
        "--data-dir", str(DATA), "--cache-dir", str(pytester.path / "cache"), "--report-dir", str(reports),
        "--stats-tokens", "2000", "--ppl-texts", "8", "-p", "no:cacheprovider", "--editor", "rome",
        "--hparam", "rome.layer=1", "--hparam", "v_num_grad_steps=4",
        "--hparam", "context_template_length_params=[[3,2]]",
        "--downstream-tasks", "boolq,sst2", "--downstream-limit", "all", "--corr-edits", "2", "--max-accuracy-drop", "1")
    result.assert_outcomes(passed=2)
    run = json.loads((reports / "latest.json").read_text())
    single, corr = sorted(run["records"], key=lambda r: r["nodeid"])
    assert "single_edit" in single["nodeid"] and "correlation" in corr["nodeid"]
    for t in ("boolq", "sst2"):
        assert {f"downstream_{t}_before", f"downstream_{t}_after"} <= set(single["metrics"])
        assert single["metrics"][f"downstream_{t}_before"] == corr["metrics"][f"downstream_{t}_before"]
        assert f"ppl_downstream_spearman_{t}" in corr["metrics"] and f"ppl_downstream_pearson_{t}" in corr["metrics"]
    assert [row["n_edits"] for row in corr["metrics"]["downstream_series"]] == [0, 1, 2]
    assert single["info"]["chance"] == {"boolq": 0.5, "sst2": 0.5} and single["info"]["examples"]["boolq"] == 4


def test_unknown_downstream_task_is_a_usage_error(pytester):
    result = pytester.runpytest(str(SUITES / "test_downstream.py"), "--downstream-tasks", "boolq,nope",   # in-process
                                "-p", "no:cacheprovider")
    assert result.ret != 0
    result.stderr.fnmatch_lines(["*--downstream-tasks: unknown downstream task 'nope'; available: *"])


def test_html_report_plots_accuracy_against_perplexity():
    from harness.report.html import build_plots
    rec = {"suite": "downstream", "editor": "rome", "outcome": "failed", "nodeid": "x",
           "metrics": {"downstream_series": [{"n_edits": 0, "ppl": 75.0, "boolq": 0.5},
                                             {"n_edits": 1, "ppl": 1445.0, "boolq": 0.45},
                                             {"n_edits": 2, "ppl": float("inf"), "boolq": 0.5}],
                       "ppl_downstream_spearman_boolq": -1.0}}
    titles = [p["title"] for p in build_plots([rec], ["rome"], 2.0)]
    assert "Downstream accuracy vs perplexity" in titles
    assert "Downstream accuracy vs perplexity" not in [p["title"] for p in build_plots([], ["rome"], 2.0)]


REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.slow
@needs_lm_eval
@pytest.mark.skipif(not (REAL_DATA / "downstream").is_dir(), reason="needs the data dir ../shared/data/downstream")
def test_downstream_suite_on_the_embedded_model(pytester):
    """One ROME edit of the embedded model, PIQA and SST-2 (8 examples each) before and after."""
    reports = pytester.path / "reports"
    result = pytester.runpytest_subprocess(
        str(SUITES / "test_downstream.py"), "-k", "single_edit", "--editor", "rome", "--data-dir", str(REAL_DATA),
        "--dataset", "builtin", "--ppl-texts", "10", "--downstream-tasks", "piqa,sst2", "--downstream-limit", "8",
        "--max-accuracy-drop", "0.3", "--report-dir", str(reports), "-p", "no:cacheprovider",
        # the statistics of tests/test_plugin.py's embedded run (one computation, cached): with the data dir the
        # default would be 100k WikiText tokens, ~40 s on one core for nothing this test checks
        "--stats-corpus", "builtin", "--stats-tokens", "5000")
    # 8 examples: one flipped answer moves accuracy by 0.125 (measured here: one ROME edit of the first built-in
    # case flips one PIQA and one SST-2 answer with 100k WikiText tokens of statistics, no PIQA and one SST-2
    # answer with these), so the bound tolerates two flips
    result.assert_outcomes(passed=1, deselected=1)
    m = json.loads((reports / "latest.json").read_text())["records"][0]["metrics"]
    for t in ("piqa", "sst2"):
        assert 0.0 <= m[f"downstream_{t}_before"] <= 1.0 and abs(m[f"downstream_{t}_drop"]) <= 0.3
        assert m[f"downstream_{t}_before"] * 8 == int(m[f"downstream_{t}_before"] * 8)      # 8 examples scored
