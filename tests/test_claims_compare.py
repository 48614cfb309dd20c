"""Issue 28, "every claim holds": what `harness compare` and `harness leaderboard` said silently wrong, and the editor
alias that split rows and dropped overrides. Each test reproduces one probe and asserts the right result or a
one-line refusal."""
from __future__ import annotations

import copy
import json
import math
import types

import pytest

from harness.cli import main
from harness.editors import registry
from harness.editors.base import load_hparams, parse_hparam_overrides
from harness.metrics.registry import summarize
from harness.report.compare import compare
from harness.report.leaderboard import board_tables, to_markdown

from .test_report import _many_cases, _write, make_run

pytest_plugins = ["pytester"]
RUN_SETTINGS = ("seq_edits", "batch_size", "ppl_schedule", "wild_dataset", "hard_dataset")   # the run config's

# ----------------------------------------------------------------------------------- leaderboard: NaN is collapse


@pytest.mark.parametrize("lost", [None, float("nan")], ids=["null", "nan"])
def test_leaderboard_counts_a_nan_ppl_ratio_as_collapse_and_ranks_it_last(lost):
    run = _many_cases("rome", n=6, ppl=lambda i: 1.0)
    nan = _many_cases("memit", n=6, ppl=lambda i: 1.0)
    for rec in nan["records"]:
        rec["metrics"]["ppl_ratio"] = lost           # NaN, written null in the run JSON: the suite calls it collapse
    run["records"] += nan["records"]
    table = board_tables([run], min_n=5)[0]
    assert [(r.editor, r.rank, r.collapsed) for r in table.rows] == [("rome", 1, 0), ("memit", 2, 6)]
    md = to_markdown([table])
    assert "| 2 | memit (collapsed) | 6 | 1 | 6/6 |" in md and "| 1 | rome | 6 | 1 | 0/6 |" in md


# ----------------------------------------------------------------------------------- compare: outcomes


def test_compare_tests_that_newly_fail_are_a_regression_named_in_one_line(tmp_path, capsys):
    base = _many_cases(n=6)
    run = copy.deepcopy(base)
    for rec in run["records"]:                       # every test now fails; the metrics are the same
        rec["outcome"], rec["message"] = "failed", "efficacy 1.0 < 1.0"
    result = compare(base, run)
    assert not result.ok
    row = next(r for r in result.rows if r.metric == "pass_rate")
    assert (row.baseline, row.current, row.status) == (1.0, 0.0, "fewer passed") and row in result.regressions
    note = next(n for n in result.notes if "passed in the baseline and fail in the run" in n)
    assert "single_edit/rome: 6 test(s)" in note and "test_single_edit[rome-c00]" in note and "\n" not in note
    assert main(["compare", _write(tmp_path, "b.json", base), _write(tmp_path, "r.json", run)]) == 1
    out = capsys.readouterr().out
    assert "**FEWER PASSED**" in out and "REGRESSION: 1 regression(s)" in out


def test_compare_says_fewer_passed_only_when_the_pass_rate_went_down():
    base = _many_cases(n=5)
    base["records"][0]["outcome"] = "failed"         # 0.8
    run = copy.deepcopy(base)
    run["records"][0]["outcome"] = "passed"
    run["records"][1]["outcome"] = "failed"          # still 0.8, but another test newly fails
    row = next(r for r in compare(base, run).rows if r.metric == "pass_rate")
    assert (row.baseline, row.current) == (0.8, 0.8) and row.status == "newly failed"
    assert not compare(base, run).ok                 # a test that passed fails now: still a regression
    fixed = copy.deepcopy(base)
    fixed["records"][0]["outcome"] = "passed"        # 0.8 -> 1.0, nothing newly failing
    row = next(r for r in compare(base, fixed).rows if r.metric == "pass_rate")
    assert row.status == "improved" and compare(base, fixed).ok


# ----------------------------------------------------------------------------------- compare: cases and records


def test_compare_a_run_missing_most_baseline_cases_is_a_regression(tmp_path, capsys):
    base = _many_cases(n=6)
    run = copy.deepcopy(base)
    run["records"] = run["records"][:1]              # 5 of 6 cases missing
    result = compare(base, run)
    rows = [(r.metric, r.status, r.n) for r in result.regressions]
    assert rows == [("cases", "missing", 5)]
    assert any("5 of 6 baseline cases are not in the run (more than 25%" in n for n in result.notes)
    assert main(["compare", _write(tmp_path, "b.json", base), _write(tmp_path, "r.json", run)]) == 1
    few = copy.deepcopy(base)
    few["records"] = few["records"][1:]              # 1 of 6 (17%): compared on the others, and said
    assert compare(base, few).ok and any("1 of 6 baseline cases" in n for n in compare(base, few).notes)


@pytest.mark.parametrize("where", ["run", "baseline"])
def test_compare_refuses_two_records_of_one_case(tmp_path, capsys, where):
    base = _many_cases(n=6)
    run = copy.deepcopy(base)
    twice = run if where == "run" else base
    extra = copy.deepcopy(twice["records"][2])
    extra["metrics"]["efficacy_success"] = 0.0       # which of the two counts would decide the verdict
    twice["records"].append(extra)
    result = compare(base, run)
    assert result.refused and not result.ok and not result.rows
    assert f"the {where} has two records of single_edit/rome case c02 (test_single_edit[rome-c02])" in result.refused
    assert main(["compare", _write(tmp_path, "b.json", base), _write(tmp_path, "r.json", run)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "two records of single_edit/rome case c02" in err


# ----------------------------------------------------------------------------------- compare: lost and impossible


def test_compare_a_removed_edits_to_collapse_is_a_regression_not_an_improvement():
    base = make_run()                                # rome collapsed after 30 edits; memit never (null)
    run = copy.deepcopy(base)
    for rec in run["records"]:
        if rec["suite"] == "sequential":
            del rec["metrics"]["edits_to_collapse"]
    result = compare(base, run)
    rows = {(r.editor, r.status) for r in result.rows if r.metric == "edits_to_collapse"}
    assert rows == {("rome", "metric missing"), ("memit", "metric missing")}
    assert not result.ok and not any(r.metric == "edits_to_collapse" for r in result.improvements)


def test_compare_a_removed_metric_is_a_regression():
    base = _many_cases(n=6)
    run = copy.deepcopy(base)
    for rec in run["records"]:
        del rec["metrics"]["paraphrase_success"]
    row = next(r for r in compare(base, run).rows if r.metric == "paraphrase_success")
    assert (row.status, row.n) == ("metric missing", 6) and row in compare(base, run).regressions


def test_compare_a_negative_ppl_ratio_is_flagged_not_an_improvement(tmp_path, capsys):
    base = _many_cases(n=6)
    run = copy.deepcopy(base)
    for rec in run["records"]:
        rec["metrics"]["ppl_ratio"] = -1.0
    result = compare(base, run)
    row = next(r for r in result.rows if r.metric == "ppl_ratio")
    assert (row.status, row.n) == ("impossible", 6) and row in result.regressions
    assert not any(r.metric == "ppl_ratio" for r in result.improvements)
    assert main(["compare", _write(tmp_path, "b.json", base), _write(tmp_path, "r.json", run)]) == 1
    assert "**IMPOSSIBLE**" in capsys.readouterr().out
    # an impossible baseline is said, never read as a change either way
    row = next(r for r in compare(run, base).rows if r.metric == "ppl_ratio")
    assert row.status == "baseline impossible" and row not in compare(run, base).improvements
    nan = copy.deepcopy(base)
    nan["records"][0]["metrics"]["ppl_ratio"] = float("nan")
    assert [r.status for r in compare(base, nan).rows if r.metric == "ppl_ratio"] == ["not a number"]


# ----------------------------------------------------------------------------------- compare: like for like


def _with_settings(run: dict, **changes) -> dict:
    run["config"].update({"seq_edits": 10, "batch_size": 1, "ppl_schedule": "every", "wild_dataset": "auto",
                          "hard_dataset": "builtin-hard"}, **changes)
    return run


@pytest.mark.parametrize("key, value", [("seq_edits", 20), ("batch_size", 4), ("ppl_schedule", "geometric"),
                                        ("wild_dataset", "qaedit"), ("hard_dataset", "/data/hard.json")])
def test_compare_refuses_runs_with_other_run_settings(tmp_path, capsys, key, value):
    base = _with_settings(make_run())
    other = _with_settings(make_run(), **{key: value})
    result = compare(base, other)
    assert result.refused and "run settings differ" in result.refused and key in result.refused
    b, r = _write(tmp_path, "b.json", base), _write(tmp_path, "r.json", other)
    assert main(["compare", b, r]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"run settings differ ({key}" in err and "--allow-different" in err
    assert main(["compare", b, r, "--allow-different"]) == 0
    assert compare(base, _with_settings(make_run())).ok
    old = make_run()                                 # a baseline written before the settings were recorded
    assert any(f"the baseline does not record {', '.join(RUN_SETTINGS)}" in n for n in compare(old, base).notes)


def test_compare_does_not_compare_timings_across_machines():
    base = _many_cases()
    slow = _many_cases(edit_s=lambda i: 2 * (2.0 + 0.1 * i))        # a regression on one machine ...
    slow["machine"].update(device="cuda", gpu_name="NVIDIA H100")     # ... but measured on another
    result = compare(base, slow)
    assert result.ok and not any(r.metric.startswith("timings.") for r in result.rows)
    note = [n for n in result.notes if n.startswith("machines differ")]
    assert len(note) == 1 and "gpu_name None vs 'NVIDIA H100'" in note[0] and "not compared" in note[0]
    anyway = compare(base, slow, allow_different=True)
    assert [r.metric for r in anyway.regressions] == ["timings.edit"]


def test_run_config_records_the_settings_compare_checks(pytester, tiny_model_dir):
    """End to end (and bullet 5): ``--editor ft --hparam ft_l.num_steps=1`` runs ft_l with num_steps 1, records it
    as ft_l, and the run config holds the settings compare checks."""
    from .test_plugin import SUITES
    result = pytester.runpytest_subprocess(
        str(SUITES / "test_single_edit.py"), "--model", str(tiny_model_dir), "--device", "cpu",
        "--cache-dir", str(pytester.path / "cache"), "--report-dir", str(pytester.path / "reports"),
        "--ppl-texts", "4", "--cases", "1", "-p", "no:cacheprovider", "--editor", "ft", "--hparam", "ft.layer=1",
        "--hparam", "ft_l.num_steps=1", "--min-efficacy", "0", "--collapse-ratio", "1e6", "--seq-edits", "3",
        "--no-wild", "--no-fluency")
    result.assert_outcomes(passed=1)
    run = json.loads((pytester.path / "reports" / "latest.json").read_text())
    assert {k: run["config"][k] for k in RUN_SETTINGS} == {"seq_edits": 3, "batch_size": 1, "ppl_schedule": "every",
                                                           "wild_dataset": "auto", "hard_dataset": "builtin-hard"}
    assert run["config"]["editors"] == ["ft_l"] and [r["editor"] for r in run["records"]] == ["ft_l"]
    assert run["records"][0]["nodeid"].endswith("[ft_l-b01]")
    assert run["records"][0]["info"]["steps"] <= 1                   # the override reached the editor
    assert run["provenance"]["editors"]["ft_l"]["hparams"]["num_steps"] == 1


# ----------------------------------------------------------------------------------- editor aliases


@pytest.mark.parametrize("selected, override", [("ft", "ft_l"), ("ft_l", "ft")])
def test_an_hparam_override_reaches_the_editor_under_either_name(selected, override):
    cls = registry.get(selected)
    assert cls is registry.get("ft_l") and cls.name == "ft_l" and "ft" in registry.names()
    overrides = parse_hparam_overrides([f"{override}.num_steps=1"], cls)
    assert overrides == {"num_steps": "1"}
    assert load_hparams(cls, "llama", overrides).num_steps == 1


def test_start_up_resolves_aliases_once():
    from harness.plugin import _canonical_editors
    options = types.SimpleNamespace(editors=["ft", "rome", "ft_l"], hparams_file=[("ft", "a.yaml")])
    files = _canonical_editors(options, {"ft": "mapping"})
    assert options.editors == ["ft_l", "rome"] and options.hparams_file == [("ft_l", "a.yaml")]
    assert files == {"ft_l": "mapping"}
    with pytest.raises(pytest.UsageError, match="a second file for editor 'ft_l'"):
        _canonical_editors(types.SimpleNamespace(editors=["ft"], hparams_file=[]), {"ft": 1, "ft_l": 2})


def _renamed(run: dict, old: str, new: str) -> dict:
    out = copy.deepcopy(run)
    for rec in out["records"]:
        rec["editor"] = new
        rec["nodeid"] = rec["nodeid"].replace(f"[{old}-", f"[{new}-")
    out["summary"] = [g.to_json() for g in summarize(out["records"])]
    return out


def test_alias_and_canonical_name_share_one_leaderboard_row_and_compare():
    old = _renamed(_many_cases(n=6), "rome", "ft")               # an older run that recorded the alias
    new = _renamed(_many_cases(n=6), "rome", "ft_l")
    new["started"] = "2026-11-22T00:00:00+00:00"
    table = board_tables([old, new], min_n=5)[0]
    assert [(r.editor, r.n, r.runs) for r in table.rows] == [("ft_l", 6, 1)]   # one row, each case once
    result = compare(old, new)
    assert result.ok and not result.notes
    assert {(r.editor, r.metric, r.n) for r in result.rows if r.metric == "efficacy_success"} == {
        ("ft_l", "efficacy_success", 6)}
    assert math.isclose(next(r.current for r in result.rows if r.metric == "pass_rate"), 1.0)
