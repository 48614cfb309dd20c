"""The WILD, generation and KnowEdit metrics wired into the suites (docs/wild.md): the single-edit, WILD, locality and
sequential protocols on the tiny model equal the same measurements done by hand; the switches, the hparams file and
the datasets are options with one-line errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from harness import protocols
from harness.data import load_cases, load_qaedit
from harness.editing import edited
from harness.metrics.generation import generation_metrics
from harness.metrics.knowedit import portability
from harness.metrics.wild import case_generations, case_metrics
from harness.models import param_digest
from harness.protocols import Measurement
from harness.session import HarnessSession
from harness.thresholds import Thresholds
from harness.timing import PhaseTimer

from .test_session import tiny_options

pytest_plugins = ["pytester"]
DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture(scope="module")
def h(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wild-protocols")
    return HarnessSession(tiny_options(tiny_model_dir, tmp, seq_edits=2, wild=True, fluency=True))


def test_single_edit_carries_wild_fluency_beside_teacher_forced(h):
    case, rome = h.cases()[0], h.editor("rome")
    before = param_digest(h.lm.model)
    m = protocols.single_edit(h, rome, case, PhaseTimer())
    assert param_digest(h.lm.model) == before
    pre_gens = case_generations(h.lm.model, h.lm.tokenizer, case)
    pre_gen, _ = generation_metrics(h.lm.model, h.lm.tokenizer, case, vectorizer=h.tfidf())
    with edited(h.lm, rome, [case]):
        wild = case_metrics(case, case_generations(h.lm.model, h.lm.tokenizer, case), pre_gens)
        gen, _ = generation_metrics(h.lm.model, h.lm.tokenizer, case, vectorizer=h.tfidf())
    assert {k: m.metrics[k] for k, v in wild.items() if v is not None} == {k: v for k, v in wild.items()
                                                                             if v is not None}
    assert m.metrics["fluency"] == gen["fluency"] and m.metrics["fluency_pre"] == pre_gen["fluency"]
    assert m.metrics["consistency"] == gen["consistency"]
    assert "efficacy_success" in m.metrics and "rewrite_acc" in m.metrics      # teacher-forced, side by side
    assert set(m.protocols) == set(m.metrics)
    assert m.info["wild_answers"]["rewrite"] and "generated_text" in m.info
    assert Thresholds(min_wild_efficacy=0.0).violations_single_edit(m) == Thresholds().violations_single_edit(m)


def test_switches_turn_the_generation_metrics_off(tiny_model_dir, tmp_path):
    h = HarnessSession(tiny_options(tiny_model_dir, tmp_path, wild=False, fluency=False))
    m = protocols.single_edit(h, h.editor("rome"), h.cases()[0], PhaseTimer())
    assert not [k for k in m.metrics if k.startswith(("wild_", "fluency", "consistency"))]
    assert "efficacy_success" in m.metrics


def test_wild_protocol_on_a_case_without_a_true_answer(h, tmp_path):
    """QAEdit-style: no target_true, so teacher-forced token accuracy and WILD, no probability comparison."""
    rec = {"id": 1, "source": "NQ", "prompt": "Which country is Toronto located in?", "target": "Italy",
           "subject": "Toronto", "rephrase": "In which country does Toronto lie?",
           "locality": [{"loc": "Who wrote Hamlet?", "loc_ans": "Shakespeare"}]}
    path = tmp_path / "qa.json"
    path.write_text(json.dumps([rec]))
    (case,) = load_qaedit(path)
    m = protocols.wild(h, h.editor("rome"), case, PhaseTimer())
    assert "efficacy_success" not in m.metrics and {"rewrite_acc", "rewrite_acc_pre", "rephrase_acc"} <= set(m.metrics)
    assert {"wild_rewrite_em", "wild_rewrite_contains", "wild_rephrase_em", "wild_locality", "wild_locality_em",
            "wild_rewrite_em_pre"} <= set(m.metrics)
    assert set(m.protocols) == set(m.metrics)
    took = Measurement({**m.metrics, "rewrite_acc": 1.0, "wild_rewrite_contains": 0.0}, info=m.info)
    bad = Thresholds(min_wild_efficacy=1.0).violations_wild(took)
    assert len(bad) == 1 and "min_wild_efficacy 1.0" in bad[0] and "--min-wild-efficacy" in bad[0]
    assert repr(m.info["wild_answers"]["rewrite"][0]) in bad[0]           # what the model said instead
    assert Thresholds().violations_wild(took) == []                       # default 0: reported, not asserted
    assert Thresholds().violations_wild(Measurement({"rewrite_acc": 0.5})) == [
        "rewrite_acc=0.500 < min_efficacy 1.0 (the edit did not take even teacher-forced; --min-efficacy)"]


def test_knowedit_case_through_single_edit_and_locality(h):
    case = load_cases(f"knowedit:{DATA / 'knowedit' / 'counterfact.json'}")[0]
    rome = h.editor("rome")
    m = protocols.single_edit(h, rome, case, PhaseTimer())
    with edited(h.lm, rome, [case]):
        expected = portability(h.lm.model, h.lm.tokenizer, case)
    assert {k: m.metrics[k] for k in expected} == expected and "portability" in expected
    loc = protocols.locality(h, rome, case, PhaseTimer())
    assert {"locality_relation_specificity", "locality_forgetfulness", "knowedit_locality", "qa_locality",
            "wild_locality"} <= set(loc.metrics)
    assert set(loc.protocols) >= set(loc.metrics)


def test_sequential_records_wild_efficacy(h):
    m = protocols.sequential(h, h.editor("rome"), h.cases(limit=2), PhaseTimer())
    assert {"wild_efficacy_immediate", "wild_efficacy_final", "wild_em_final", "rewrite_acc_final"} <= set(m.metrics)
    assert 0.0 <= m.metrics["wild_efficacy_final"] <= 1.0


def test_hparams_file_becomes_the_editors_hyper_parameters(tiny_model_dir, tmp_path):
    data = yaml.safe_load((DATA / "easyedit" / "memit-llama.yaml").read_text())
    data.update(layers=[1, 2], v_num_grad_steps=4, context_template_length_params=[[3, 2]])
    good = tmp_path / "memit.yaml"
    good.write_text(yaml.safe_dump(data))
    h = HarnessSession(tiny_options(tiny_model_dir, tmp_path, hparams_file=[("memit", str(good))],
                                    hparams=["memit.v_num_grad_steps=3"]))
    hp = h.editor("memit").hparams
    assert hp.layers == [1, 2] and hp.v_num_grad_steps == 3 and hp.mom2_update_weight == 15000
    assert h.hparams_file("memit").record()["hparams"]["layers"] == [1, 2]
    gpt2 = HarnessSession(tiny_options(tiny_model_dir, tmp_path,
                                       hparams_file=[("rome", str(DATA / "easyedit" / "rome-gpt2-xl.yaml"))]))
    with pytest.raises(Exception, match="rewrite_module_tmp 'transformer.h.{}.mlp.c_proj' names no module"):
        gpt2.editor("rome")


def test_hparams_file_is_recorded_in_the_run_json(pytester, tiny_model_dir):
    data = yaml.safe_load((DATA / "easyedit" / "memit-llama.yaml").read_text())
    data.update(layers=[1, 2])
    (pytester.path / "memit.yaml").write_text(yaml.safe_dump(data))
    pytester.makepyfile(test_x="def test_x(harness, record):\n    record.add({'x': 1.0}, protocol='p')\n")
    result = pytester.runpytest("-p", "no:cacheprovider", "--hparams-file", "memit=memit.yaml", "--model",
                                str(tiny_model_dir), "--device", "cpu", "--report-dir", str(pytester.path / "reports"))
    assert result.ret == 0
    result.stdout.fnmatch_lines(["*EasyEditHparamsWarning: memit.yaml: 'model_name' ignored (the model is --model)"])
    run = json.loads((pytester.path / "reports" / "latest.json").read_text())
    became = run["config"]["hparams_files"]["memit"]
    assert became["hparams"]["layers"] == [1, 2] and became["stats"]["stats_tokens"] == 100000
    assert "model_name" in became["ignored"] and run["config"]["wild"] is False   # off by default


@pytest.mark.parametrize("args,line", [
    (["--hparams-file", "rome"], "--hparams-file rome: expected EDITOR=PATH.yaml*"),
    (["--hparams-file", "rome=missing.yaml"], "--hparams-file missing.yaml: file not found"),
    (["--hparams-file", f"rome={DATA / 'easyedit' / 'memit-llama.yaml'}"], "*the file is for 'MEMIT', not editor 'rome'*"),
    (["--hparams-file", "nope=x.yaml"], "--hparams-file nope=x.yaml: unknown editor 'nope'*"),
])
def test_bad_hparams_file_is_a_one_line_usage_error(pytester, args, line):
    pytester.makepyfile(test_x="def test_x():\n    pass\n")
    result = pytester.runpytest("-p", "no:cacheprovider", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: {line}"])


def test_wild_switch_and_ini(pytester):
    pytester.makeconftest(
        "def pytest_sessionfinish(session):\n"
        "    from harness.plugin import _SESSION\n"
        "    o = session.config.stash[_SESSION].options\n"
        "    print('VALUES', o.wild, o.fluency)\n")
    pytester.makepyfile(test_x="def test_x():\n    pass\n")
    # off by default (generation costs more than the edit on CPU: README), one flag or one ini key away
    pytester.runpytest("-p", "no:cacheprovider", "-s").stdout.fnmatch_lines(["*VALUES False False*"])
    pytester.runpytest("-p", "no:cacheprovider", "-s", "--wild").stdout.fnmatch_lines(["*VALUES True False*"])
    pytester.makeini("[pytest]\nharness_fluency = true\n")
    pytester.runpytest("-p", "no:cacheprovider", "-s").stdout.fnmatch_lines(["*VALUES False True*"])
    pytester.runpytest("-p", "no:cacheprovider", "-s", "--no-fluency").stdout.fnmatch_lines(["*VALUES False False*"])
    pytester.makeini("[pytest]\nharness_wild = maybe\n")
    result = pytester.runpytest("-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: --wild maybe: expected true or false"])


def _spec_for(name: str, specs) -> dict | None:
    import re
    base = name.removesuffix("_pre")
    for spec in specs:
        pattern = "^" + re.sub(r"\\\{\w+\\\}", ".+", re.escape(spec["name"])) + "$"
        if re.match(pattern, base):
            return spec
    return None


def test_every_new_metric_has_a_registry_spec(h):
    """What the metric registry needs for each metric these protocols add (METRIC_SPECS, MetricSpec's fields)."""
    import importlib

    from harness.metrics import generation, knowedit, wild
    specs = [*wild.METRIC_SPECS, *generation.METRIC_SPECS, *knowedit.METRIC_SPECS,
             *importlib.import_module("harness.protocols.sequential").METRIC_SPECS]
    for spec in specs:
        assert {"name", "protocol", "higher_is_better", "label", "description"} <= set(spec)
    case = load_cases(f"knowedit:{DATA / 'knowedit' / 'zsre.json'}")[0]
    rome = h.editor("rome")
    names = set(protocols.single_edit(h, rome, case, PhaseTimer()).metrics)
    names |= set(protocols.locality(h, rome, case, PhaseTimer()).metrics)
    names |= set(protocols.sequential(h, rome, h.cases(limit=1), PhaseTimer()).metrics)
    new = {n for n in names if n.startswith(("wild_", "fluency", "consistency", "portability", "locality_",
                                             "knowedit_", "rewrite_acc_final"))}
    assert {"wild_rewrite_em", "fluency", "portability_reasoning", "locality_relation_specificity"} <= new
    assert [n for n in sorted(new) if _spec_for(n, specs) is None] == []
