"""Target-diversity edit sets, edited-layer norms, correlations and decline curves (the D4S paper's two findings as
measurements): sets share subjects and differ only in targets, diversity is measured right, the norms are the sums
and means they claim, correlations agree with scipy, and a real edit stream on a tiny model fills a curve."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.data import DataError, EditCase
from harness.data.diversity import (KINDS, build_diversity_sets, entropy_bits, few_objects, load_diversity_sets,
                                    select_distinct, target_diversity)
from harness.editors import build_editor
from harness.metrics import counterfact_metrics
from harness.metrics.decline import DeclineCurve, DeclinePoint, diversity_decline, rewrite_efficacy, target_nll
from harness.metrics.norms import correlation, l1_norm, mean_abs, norm_growth, total_l1, weight_norms

from .conftest import TINY_HPARAMS, make_stats
from .test_data import REAL, needs_real
from .test_plugin import tiny_model_dir  # noqa: F401  (fixture)

pytest_plugins = ["pytester"]


@pytest.fixture(scope="module")
def sets(builtin_cases):
    return build_diversity_sets(builtin_cases, 12)


# ------------------------------------------------------------------------------------------------ the sets

def test_sets_share_subjects_order_and_length(sets, builtin_cases):
    assert list(sets) == list(KINDS)
    base = select_distinct(builtin_cases, 12)
    for kind, s in sets.items():
        assert [c.subject for c in s.cases] == [c.subject for c in base], kind
        assert [c.case_id for c in s.cases] == [f"{c.case_id}:{kind}" for c in base]
        for c in s.cases:
            assert c.rewrite_prompt.count(c.subject) >= 1 and c.target_new != c.target_true
            assert c.extra.get("diversity_kind", kind) == kind


def test_diversity_increases_from_yesno_to_distinct(sets):
    d = {k: s.diversity() for k, s in sets.items()}
    assert [d[k].n_distinct_targets for k in KINDS] == [2, 4, 4, 12]
    assert d["yesno"].target_entropy == pytest.approx(1.0)          # balanced Yes / No
    assert d["choice"].target_entropy == pytest.approx(2.0)         # letters cycle A-D over 12 edits
    assert d["distinct"].target_entropy == pytest.approx(math.log2(12))
    assert d["yesno"].target_entropy < d["few"].target_entropy <= d["choice"].target_entropy < d["distinct"].target_entropy


def test_yesno_states_the_new_or_the_true_target(sets, builtin_cases):
    base = select_distinct(builtin_cases, 12)
    for i, (b, c) in enumerate(zip(base, sets["yesno"].cases)):
        stated, new = (b.target_new, "Yes") if i % 2 == 0 else (b.target_true, "No")
        assert c.rewrite_prompt == f"{b.rewrite_prompt} {stated}.\nIs this correct? Answer:"
        assert c.target_new == new and c.target_true == {"Yes": "No", "No": "Yes"}[new]
        # a neighbour's statement names the same target; its correct answer is the case's true one
        assert all(p.endswith(f" {stated}.\nIs this correct? Answer:") for p in c.neighborhood_prompts)
        assert len(c.paraphrase_prompts) == len(b.paraphrase_prompts)


def test_choice_lists_four_options_with_both_answers(sets, builtin_cases):
    base = select_distinct(builtin_cases, 12)
    for i, (b, c) in enumerate(zip(base, sets["choice"].cases)):
        options = c.extra["options"]
        assert len(options) == len({o.lower() for o in options}) == 4
        assert c.target_new == "ABCD"[i % 4] and options["ABCD".index(c.target_new)] == b.target_new
        assert options["ABCD".index(c.target_true)] == b.target_true
        for letter, opt in zip("ABCD", options):
            assert f"\n{letter}. {opt}" in c.rewrite_prompt
        assert c.rewrite_prompt.startswith(b.rewrite_prompt) and c.rewrite_prompt.endswith("\nAnswer:")
    # distractors of a relation come from the same relation when it has enough answers (countries here)
    assert set(sets["choice"].cases[0].extra["options"]) <= {c.target_new for c in builtin_cases if
                                                            c.relation_id == "P17"} | {
        c.target_true for c in builtin_cases if c.relation_id == "P17"}


def test_few_reuses_the_pools_most_frequent_targets(sets, builtin_cases):
    objects = few_objects(builtin_cases)
    assert objects == ["Spanish", "French", "English", "baseball"]      # the four targets used twice in the set
    base = select_distinct(builtin_cases, 12)
    for b, c in zip(base, sets["few"].cases):
        assert c.target_new in objects and c.target_new != b.target_true
        assert c.prompt == b.prompt and c.paraphrase_prompts == b.paraphrase_prompts


def test_braces_in_targets_stay_literal():
    case = EditCase("x", "Zorp", "{} likes", target_new="{curly}", target_true="round",
                    paraphrase_prompts=("Zorp really likes",))
    others = [EditCase(str(i), f"S{i}", "{} likes", target_new=f"t{i}", target_true=f"u{i}") for i in range(4)]
    sets = build_diversity_sets([case, *others], 1, objects=["a", "b"])
    assert sets["yesno"].cases[0].rewrite_prompt == "Zorp likes {curly}.\nIs this correct? Answer:"
    assert "\nA. {curly}" in sets["choice"].cases[0].rewrite_prompt


def test_bad_requests_are_one_line_errors(builtin_cases):
    with pytest.raises(DataError, match=r"only \d+ of 40 cases have distinct targets .* fewer than the 100 edits"):
        build_diversity_sets(builtin_cases, 100)
    with pytest.raises(DataError, match="unknown diversity set 'colour'; use some of yesno, choice, few, distinct"):
        build_diversity_sets(builtin_cases, 4, kinds=["colour"])
    with pytest.raises(DataError, match="at least 1 edit"):
        select_distinct(builtin_cases, 0)
    with pytest.raises(DataError, match="dataset 'builtin-hard': only"):
        load_diversity_sets("builtin-hard", 500)
    assert list(build_diversity_sets(builtin_cases, 4, kinds=["distinct", "yesno"])) == ["yesno", "distinct"]


@needs_real
@pytest.mark.parametrize("spec", ["counterfact", "zsre"])
def test_real_data_builds_fifty_edit_sets(spec):
    sets = load_diversity_sets(spec, 50, data_dir=REAL, skip_invalid=True)
    assert [s.diversity().n_distinct_targets for s in sets.values()] == [2, 4, 4, 50]
    subjects = {tuple(c.subject for c in s.cases) for s in sets.values()}
    assert len(subjects) == 1


# ------------------------------------------------------------------------------------------------ diversity

def test_entropy_and_token_diversity(tiny_tokenizer):
    assert entropy_bits([]) == 0.0 and entropy_bits(["a", "a"]) == 0.0
    assert entropy_bits(["a", "b", "c", "d"]) == pytest.approx(2.0)
    assert entropy_bits(["a", "a", "a", "b"]) == pytest.approx(-(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25)))
    d = target_diversity(["Yes", "No", "Yes", " No "], tiny_tokenizer)
    assert (d.n_edits, d.n_distinct_targets, d.target_entropy) == (4, 2, 1.0)
    ids = {tuple(tiny_tokenizer(" " + t, add_special_tokens=False).input_ids) for t in ("Yes", "No")}
    assert d.n_distinct_target_tokens == len({i for seq in ids for i in seq})
    assert d.mean_target_tokens == pytest.approx(sum(len(s) for s in ids) / 2)
    assert target_diversity(["Yes"]).n_distinct_target_tokens is None


# ------------------------------------------------------------------------------------------------ norms

def test_norms_are_sum_and_mean_of_abs(tiny_llama):
    w = torch.tensor([[1.0, -2.0], [0.5, -0.25]])
    assert l1_norm(w) == 3.75 and mean_abs(w) == pytest.approx(3.75 / 4)
    names = [n for n, _ in tiny_llama.model.named_parameters() if "down_proj" in n][:2]
    norms = weight_norms(tiny_llama.model, names)
    params = dict(tiny_llama.model.named_parameters())
    for n in names:
        assert norms[n]["l1"] == pytest.approx(params[n].detach().double().abs().sum().item(), rel=1e-12)
        assert norms[n]["mean_abs"] == pytest.approx(norms[n]["l1"] / params[n].numel())
    assert total_l1(norms) == pytest.approx(sum(v["l1"] for v in norms.values()))
    with pytest.raises(KeyError, match="no parameter named 'nope'.*edited_parameters"):
        weight_norms(tiny_llama.model, ["nope"])
    assert norm_growth(2.0, 3.0) == 1.5 and norm_growth(0.0, 1.0) == math.inf and math.isnan(norm_growth(0.0, 0.0))


def test_correlation_edge_cases():
    c = correlation([1, 2, 3, 4], [10, 20, 30, 1000])
    assert c.spearman == pytest.approx(1.0) and 0.5 < c.pearson < 1.0 and c.n == 4
    assert correlation([1, 2, 3], [5, 5, 5]).spearman is None          # a constant series
    assert correlation([1, 2], [1, 2]).pearson is None                   # too few pairs
    c = correlation([1, 2, None, 4, float("nan"), 6], [3, 2, 9, 1, 9, 0])
    assert c.n == 4 and c.spearman == pytest.approx(-1.0)
    assert c.to_dict("x_") == {"x_spearman": c.spearman, "x_pearson": c.pearson, "x_n": 4}
    with pytest.raises(ValueError, match="paired series"):
        correlation([1, 2, 3], [1, 2])


finite = st.floats(-1e6, 1e6, allow_nan=False).map(lambda v: round(v, 3))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(finite, finite), min_size=3, max_size=30))
def test_correlation_matches_scipy(pairs):
    stats = pytest.importorskip("scipy.stats")
    x, y = [a for a, _ in pairs], [b for _, b in pairs]
    c = correlation(x, y)
    if len(set(x)) < 2 or len(set(y)) < 2:
        assert c.spearman is None and c.pearson is None
        return
    assert c.spearman == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-9)
    assert c.pearson == pytest.approx(stats.pearsonr(x, y).statistic, abs=1e-6)
    # Spearman sees ranks only: a strictly increasing transform of x (v -> v|v|) leaves it unchanged
    assert correlation([v * abs(v) for v in x], y).spearman == pytest.approx(c.spearman, abs=1e-9)


# ------------------------------------------------------------------------------------------------ decline

def _curve(l1s, effs, ppls=None, downstream=None):
    curve = DeclineCurve()
    for i, (l1, e) in enumerate(zip(l1s, effs)):
        curve.add(DeclinePoint(i, (ppls or [10.0] * len(l1s))[i], e, l1, {"w": l1 / 100},
                               {"piqa": downstream[i]} if downstream else {}))
    return curve


def test_decline_curve_metrics():
    curve = _curve([100, 110, 130, 170], [None, 1.0, 0.5, 0.25], [10, 11, 15, 30], [0.7, 0.7, 0.6, 0.5])
    m = curve.metrics([1.0, 1.0, 0.0])
    assert m["ppl_ratio_curve"] == [[0, 1.0], [1, 1.1], [2, 1.5], [3, 3.0]]
    assert m["l1_growth_curve"][-1] == [3, 1.7] and m["norm_growth"] == pytest.approx(1.7)
    assert m["efficacy_immediate"] == pytest.approx(2 / 3) and m["efficacy_final"] == 0.25
    assert m["efficacy_decline"] == pytest.approx(2 / 3 - 0.25)
    assert m["norm_efficacy_spearman"] == pytest.approx(-1.0) and m["norm_efficacy_n"] == 3   # base point left out
    assert m["downstream_piqa_curve"][-1] == [3, 0.5] and m["downstream_piqa_drop"] == pytest.approx(0.2)
    assert m["mean_abs_curve"][0] == [0, 1.0]
    with pytest.raises(ValueError, match="must follow the stream"):
        curve.add(DeclinePoint(2, None, None, 1.0, {}))
    with pytest.raises(ValueError, match="starts with the unedited model"):
        DeclineCurve([DeclinePoint(1, None, 1.0, 1.0, {})]).metrics([1.0])


def test_diversity_decline_correlates_across_sets():
    rows = [{"n_edits": 20, "target_entropy": h, "ppl_ratio": r, "efficacy_final": f, "efficacy_decline": d,
             "norm_growth": g} for h, r, f, d, g in
            [(1.0, 1.01, 1.0, 0.0, 1.01), (2.0, 1.05, 0.9, 0.1, 1.1), (2.0, 1.04, 0.95, 0.05, 1.05),
             (4.3, 1.5, 0.5, 0.5, 2.0)]]
    out = diversity_decline(rows)
    assert out["n_sets"] == 4 and out["diversity_ppl_ratio_spearman"] > 0.9
    assert out["diversity_efficacy_loss_spearman"] > 0.9 and out["diversity_norm_growth_pearson"] > 0.9
    with pytest.raises(ValueError, match="fixed number of edits"):
        diversity_decline([*rows, {"n_edits": 50, "target_entropy": 5.6}])


# ------------------------------------------------------------------------------------------------ on a model

def test_rewrite_efficacy_agrees_with_counterfact_metrics(tiny_gpt2, sets):
    cases = [c for s in sets.values() for c in s.cases[:3]]
    fast = rewrite_efficacy(tiny_gpt2.model, tiny_gpt2.tokenizer, cases)
    slow = [counterfact_metrics(tiny_gpt2.model, tiny_gpt2.tokenizer, c)["efficacy_success"] for c in cases]
    assert fast == slow
    assert math.isfinite(target_nll(tiny_gpt2.model, tiny_gpt2.tokenizer, cases))
    with pytest.raises(ValueError, match="needs target_true"):
        rewrite_efficacy(tiny_gpt2.model, tiny_gpt2.tokenizer, [replace(cases[0], target_true=None)])


def test_a_rome_stream_on_each_set_fills_a_curve(tiny_llama, sets, tmp_path):
    """Two sequential ROME edits per set on a tiny model: every kind of prompt is editable (the subject is found in
    the templated prompt; a random model is no test of whether an edit takes), and the curve records the norms."""
    rome = build_editor("rome", tiny_llama, TINY_HPARAMS["rome"], stats=make_stats(tiny_llama, tmp_path))
    names = rome.edited_parameters(tiny_llama)
    lm = tiny_llama
    for kind, s in sets.items():
        cases = list(s.cases[:2])
        snapshot = {n: p.detach().clone() for n, p in lm.model.named_parameters() if n in names}
        norms = weight_norms(lm.model, names)
        curve = DeclineCurve([DeclinePoint(0, None, None, total_l1(norms), {n: v["mean_abs"] for n, v in norms.items()})])
        immediate = []
        try:
            for n, case in enumerate(cases, 1):
                rome.apply(lm, [case])
                immediate += rewrite_efficacy(lm.model, lm.tokenizer, [case])
                norms = weight_norms(lm.model, names)
                curve.add(DeclinePoint(n, None, sum(rewrite_efficacy(lm.model, lm.tokenizer, cases[:n])) / n,
                                       total_l1(norms), {k: v["mean_abs"] for k, v in norms.items()}))
        finally:
            with torch.no_grad():
                for n, p in lm.model.named_parameters():
                    if n in snapshot:
                        p.copy_(snapshot[n])
            rome.reset()
        m = curve.metrics(immediate)
        assert m["n_edits"] == 2 and m["l1_after"] != m["l1_before"] and m["norm_growth"] > 0, kind


def test_decline_stream_measures_every_checkpoint_and_restores(tiny_llama, sets, tmp_path):
    from harness.metrics import perplexity
    from harness.models import param_digest
    from harness.protocols.diversity import decline_stream
    from harness.timing import PhaseTimer

    lm = tiny_llama
    texts = ["The river runs past the old mill.", "A small village sat at the foot of the hills."]

    def ppl() -> float:
        return perplexity(lm.model, lm.tokenizer, texts).mean_ppl
    rome = build_editor("rome", lm, TINY_HPARAMS["rome"], stats=make_stats(lm, tmp_path))
    before = param_digest(lm.model)
    timer = PhaseTimer()
    cases = list(sets["choice"].cases[:3])
    stream = decline_stream(lm, rome, cases, perplexity=ppl, ppl_base=ppl(), journal_dir=tmp_path / "j",
                            timer=timer, ppl_schedule="every:2")
    assert param_digest(lm.model) == before                       # restored after the stream
    assert [p.n_edits for p in stream.curve.points] == [0, 1, 2, 3]          # accuracy and norms after every edit
    m = stream.metrics()
    assert [n for n, _ in m["ppl_ratio_curve"]] == [0, 2, 3]                  # perplexity on the schedule
    assert [s["ppl"] is not None for s in stream.result.steps] == [False, True, True]
    final = [f["efficacy_success"] for f in stream.result.final.values()]
    assert m["efficacy_final"] == pytest.approx(sum(final) / len(final))   # the curve's last point = the re-scoring
    assert m["efficacy_immediate_each"] == [s["efficacy"][0] for s in stream.result.steps]
    assert m["l1_before"] == pytest.approx(total_l1(weight_norms(lm.model, rome.edited_parameters(lm))))
    assert m["l1_after"] != m["l1_before"] and m["ppl_ratio_curve"][0] == [0, 1.0]
    assert math.isfinite(m["target_nll"]) and {"edit", "perplexity", "evaluate_curve"} <= set(timer.seconds)
    assert len((tmp_path / "j").glob("*.jsonl").__next__().read_text().splitlines()) == 3


# ------------------------------------------------------------------------------------------------ verdicts

def test_norm_growth_and_diversity_verdicts():
    from harness.protocols import Measurement
    from harness.thresholds import Thresholds

    t = Thresholds(max_norm_growth=1.5)
    ok = Measurement({"ppl_ratio_curve": [[0, 1.0], [5, 1.4]], "norm_growth": 1.2, "n_edits": 5})
    assert t.violations_diversity(ok) == []
    bad = Measurement({"ppl_ratio_curve": [[0, 1.0], [5, 2.5], [10, float("inf")]], "norm_growth": 1.75,
                       "l1_before": 100.0, "l1_after": 175.0, "n_edits": 10}, info={"diversity_set": "few"})
    assert t.violations_diversity(bad) == [
        "ppl_ratio=2.500 after 5 of 10 edits >= collapse threshold 2.0 (few set; --collapse-ratio)",
        "norm_growth=1.750 > max_norm_growth 1.5 (L1 norm of the edited layers 100 -> 175 over 10 edits; "
        "--max-norm-growth)"]
    seq = Measurement({"edits_to_collapse": None, "n_edits": 4, "norm_growth": float("nan")})
    assert t.violations_sequential(seq) == []                  # a norm that was never measured is no violation
    seq.metrics.update(norm_growth=float("inf"), l1_before=0.0, l1_after=3.0)
    assert t.violations_sequential(seq)[0].startswith("norm_growth=inf > max_norm_growth 1.5")
    table = [{"target_entropy": h} for h in (1.0, 2.0, 2.0)]
    assert t.violations_diversity_summary(Measurement({"n_sets": 3, "diversity_table": table})) == []
    assert t.violations_diversity_summary(Measurement({"n_sets": 2, "diversity_table": table[1:]})) == [
        "2 set(s) with 1 distinct target entropies: diversity against decline needs 3 or more sets that differ in "
        "diversity (--diversity-sets)"]


# ------------------------------------------------------------------------------------------------ the suite

def _suite(pytester, model_dir, *extra, in_process=False):
    """The suite in a fresh pytest process; ``in_process``: in this one, for the runs that stop at a usage error."""
    from .test_plugin import SUITES
    run = pytester.runpytest if in_process else pytester.runpytest_subprocess
    return run(
        str(SUITES / "test_diversity.py"), "--model", str(model_dir), "--device", "cpu",
        "--cache-dir", str(pytester.path / "cache"), "--report-dir", str(pytester.path / "reports"),
        "-p", "no:cacheprovider", "--stats-tokens", "2000", "--ppl-texts", "4", "--dataset", "builtin",
        "--hparam", "rome.layer=1", "--hparam", "v_num_grad_steps=3", "--hparam",
        "context_template_length_params=[[3,2]]", "--editor", "rome", "--seq-edits", "3", "--ppl-schedule", "every:2",
        *extra)


def test_diversity_suite_records_streams_and_the_comparison(pytester, tiny_model_dir):  # noqa: F811
    import json
    result = _suite(pytester, tiny_model_dir, "--diversity-sets", "yesno,choice,distinct", "--collapse-ratio", "1e6",
                    "--max-norm-growth", "1e6")
    result.assert_outcomes(passed=4)
    run = json.loads((pytester.path / "reports" / "latest.json").read_text())
    streams = [r for r in run["records"] if "stream" in r["nodeid"]]
    assert [r["case_id"] for r in streams] == ["choice", "distinct", "yesno"]            # sorted by node id
    for r in streams:
        m = r["metrics"]
        assert r["suite"] == "diversity" and m["n_edits"] == 3 and r["info"]["diversity_set"] == r["case_id"]
        assert [n for n, _ in m["efficacy_curve"]] == [1, 2, 3] and [n for n, _ in m["ppl_ratio_curve"]] == [0, 2, 3]
        assert m["norm_growth"] == pytest.approx(m["l1_after"] / m["l1_before"])
        assert {"target_entropy", "token_entropy", "target_nll", "norm_efficacy_spearman"} <= set(m)
    (summary,) = [r for r in run["records"] if "decline" in r["nodeid"]]
    assert summary["metrics"]["n_sets"] == 3 and len(summary["metrics"]["diversity_table"]) == 3
    assert "diversity_ppl_ratio_spearman" in summary["metrics"]
    html = (pytester.path / "reports" / "latest.html").read_text()
    assert "Target diversity: accuracy and edited-layer norm" in html
    assert "Target diversity: decline against the diversity of the targets" in html


def test_diversity_suite_asserts_norm_growth_and_rejects_bad_sets(pytester, tiny_model_dir):  # noqa: F811
    result = _suite(pytester, tiny_model_dir, "--diversity-sets", "yesno", "--collapse-ratio", "1e6",
                    "--max-norm-growth", "1e-3")
    result.assert_outcomes(failed=1, skipped=1)
    result.stdout.fnmatch_lines(["*norm_growth=* > max_norm_growth 0.001 (L1 norm of the edited layers * over 3 "
                                 "edits; --max-norm-growth)*"])
    result = _suite(pytester, tiny_model_dir, "--diversity-sets", "colour", in_process=True)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--diversity-sets colour: unknown set 'colour'; use some of yesno, choice, few, "
                                 "distinct (comma-separated) or all*"])
    result = _suite(pytester, tiny_model_dir, "--seq-edits", "100", in_process=True)
    assert result.ret != pytest.ExitCode.OK and "Traceback" not in result.stdout.str()
    result.stdout.fnmatch_lines(["*diversity suite: dataset 'builtin': only 36 of 40 cases have distinct targets*"])


def test_the_report_plots_the_streams():
    from harness.report.html import build_plots, plot_diversity

    def rec(editor, kind, grow):
        return {"suite": "diversity", "editor": editor, "case_id": kind, "outcome": "passed",
                "info": {"diversity_set": kind},
                "metrics": {"efficacy_curve": [[1, 1.0], [2, 0.5]], "l1_growth_curve": [[0, 1.0], [2, grow]]}}
    records = [rec("rome", "yesno", 1.4), rec("rome", "distinct", 2.0), rec("d4s", "yesno", 1.01)]
    fig = plot_diversity(records, ["rome", "d4s"])
    left, right = fig.axes
    assert len(left.lines) == len(right.lines) == 3
    assert [line.get_linestyle() for line in right.lines] == [":", "-", ":"]
    assert right.lines[1].get_ydata()[-1] == 2.0 and left.get_ylabel() == "accuracy of the edits so far"
    assert plot_diversity([{**records[0], "suite": "sequential"}], ["rome"]) is None
    titles = [p["title"] for p in build_plots(records, ["rome", "d4s"], 2.0)]
    assert "Target diversity: accuracy and edited-layer norm along each stream" in titles


def test_the_report_plots_decline_against_diversity():
    from harness.report.html import build_plots, plot_diversity_decline

    def rec(editor, kind, entropy, final, ppl, grow, n=20):
        return {"suite": "diversity", "editor": editor, "case_id": kind, "outcome": "passed",
                "info": {"diversity_set": kind},
                "metrics": {"n_edits": n, "target_entropy": entropy, "efficacy_final": final, "ppl_ratio": ppl,
                            "norm_growth": grow}}
    records = [rec("rome", "distinct", 4.32, 0.25, 1.3, 2.0), rec("rome", "yesno", 1.0, 0.75, 1.1, 1.4),
               rec("d4s", "yesno", 1.0, 1.0, None, 1.01),
               {"suite": "diversity", "editor": "rome", "case_id": "decline", "metrics": {"n_sets": 2}}]
    fig = plot_diversity_decline(records, ["rome", "d4s"])
    loss, ppl, norm = fig.axes
    assert [line.get_label() for line in loss.lines] == ["d4s_N20", "rome_N20"]
    # sorted by entropy within an editor; the left panel is 1 - the final accuracy
    assert list(loss.lines[1].get_xdata()) == [1.0, 4.32] and list(loss.lines[1].get_ydata()) == [0.25, 0.75]
    assert [line.get_label() for line in ppl.lines] == ["rome_N20"]   # d4s has no ppl_ratio: no line
    assert list(norm.lines[1].get_ydata()) == [1.4, 2.0] and norm.get_xlabel() == "target entropy (bits)"
    assert plot_diversity_decline([{**records[0], "suite": "sequential"}], ["rome"]) is None
    titles = [p["title"] for p in build_plots(records, ["rome", "d4s"], 2.0)]
    assert "Target diversity: decline against the diversity of the targets" in titles


def test_a_shorter_family_is_a_prefix_of_a_longer_one(builtin_cases):
    """The analysis reads the first N edits of a longer stream as the N-edit stream: the sets must be prefixes."""
    short, long = build_diversity_sets(builtin_cases, 10), build_diversity_sets(builtin_cases, 20)
    for kind in KINDS:
        assert short[kind].cases == long[kind].cases[:10], kind


def test_every_diversity_metric_is_registered(tiny_llama, sets, tmp_path):
    """What the diversity protocols write into records is in harness/metrics/registry.py (sequential's norm metrics
    are checked by tests/test_registry.py through SequentialResult.metrics)."""
    from harness.metrics.registry import get_metric
    from harness.protocols import Measurement, diversity_summary
    from harness.protocols.diversity import decline_stream
    from harness.timing import PhaseTimer

    lm = tiny_llama
    rome = build_editor("rome", lm, TINY_HPARAMS["rome"], stats=make_stats(lm, tmp_path))
    stream = decline_stream(lm, rome, list(sets["yesno"].cases[:2]), perplexity=lambda: 10.0, ppl_base=10.0,
                            journal_dir=tmp_path / "j", timer=PhaseTimer(), downstream=lambda: {"piqa": 0.5})
    stream_metrics = {**sets["yesno"].diversity(lm.tokenizer).to_dict(), **stream.metrics()}
    rows = [Measurement({**stream_metrics, "target_entropy": h}, info={"diversity_set": k})
            for k, h in (("yesno", 1.0), ("choice", 2.0), ("distinct", 3.0))]
    names = set(stream_metrics) | set(diversity_summary(rows).metrics)
    assert {"downstream_piqa_curve", "downstream_piqa_drop", "diversity_ppl_ratio_spearman"} <= names
    missing = sorted(n for n in names if get_metric(n) is None)
    assert not missing, f"diversity metrics not in harness/metrics/registry.py: {missing}"
