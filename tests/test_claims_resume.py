"""Issue 28, resume: a sequential run is resumed only by a run with the same settings. Other perplexity texts,
other key statistics (corpus or tokens) or a dataset file whose cases changed under the same ids are refused in
one line that names what differs and how to go on; the same settings resume as before (docs/guarantees.md)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness.data.loaders import BUILTIN_DIR
from harness.sequential import SequentialRun, run_key_parts

from .test_sequential import _args, _seq_record, tiny_model_dir  # noqa: F401  (fixture)

N = "3"


def _pytest(model_dir: Path, reports: Path, cwd: Path, *extra: str) -> subprocess.CompletedProcess:
    """One sequential-suite run (ROME, 3 edits) in a subprocess; ``extra`` replaces the defaults it names."""
    args = _args(model_dir, reports, "--editor", "rome", "--seq-edits", N, *extra)
    return subprocess.run([sys.executable, "-m", "pytest", *args], env={**os.environ, "OMP_NUM_THREADS": "1"},
                          cwd=cwd, capture_output=True, text=True, timeout=600)


def _message(reports: Path) -> str:
    return _seq_record(reports)["message"] or ""


@pytest.fixture(scope="module")
def finished(tiny_model_dir, tmp_path_factory):  # noqa: F811
    """A finished sequential run on a copy of the builtin cases (its journal and checkpoint stay for a resume)."""
    root = tmp_path_factory.mktemp("claims-resume")
    data = root / "edits.json"
    shutil.copy(BUILTIN_DIR / "edits.json", data)
    reports = root / "reports"
    proc = _pytest(tiny_model_dir, reports, root, "--dataset", str(data))
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert _seq_record(reports)["info"]["resumed_from"] == 0
    return root, data, reports


def _copy(finished, tmp_path: Path) -> tuple[Path, Path]:
    """The finished run's report dir and dataset, copied: each test resumes its own."""
    root, data, reports = finished
    shutil.copytree(reports, tmp_path / "reports")
    shutil.copy(data, tmp_path / "edits.json")
    return tmp_path / "edits.json", tmp_path / "reports"


def test_resume_with_the_same_settings_resumes(finished, tiny_model_dir, tmp_path):  # noqa: F811
    data, reports = _copy(finished, tmp_path)
    proc = _pytest(tiny_model_dir, reports, tmp_path, "--dataset", str(data), "--resume")
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert _seq_record(reports)["info"]["resumed_from"] == int(N)


@pytest.mark.parametrize("change, named", [
    (("--ppl-texts", "4"), "the perplexity texts"),
    (("--stats-tokens", "1000"), "the key-statistics corpus or tokens"),
    (("--stats-corpus", "builtin-sentences"), "the key-statistics corpus or tokens"),
])
def test_resume_with_other_settings_is_refused(finished, tiny_model_dir, tmp_path, change, named):  # noqa: F811
    """Before: the run resumed, mixing 8-text and 4-text perplexities in one curve (or two C matrices in one
    stream). After: a one-line refusal naming the setting and the way on."""
    data, reports = _copy(finished, tmp_path)
    journal = next((reports / "sequential").glob("rome-*.jsonl"))
    before = journal.read_bytes()
    proc = _pytest(tiny_model_dir, reports, tmp_path, "--dataset", str(data), "--resume", *change)
    assert proc.returncode == 1, proc.stdout[-3000:]
    msg = _message(reports)
    assert "\n" not in msg
    assert f"checkpoint of a run with other settings ({named}" in msg and "differ)" in msg, msg
    assert "rerun with its original settings" in msg and "rerun without --resume" in msg, msg
    assert journal.read_bytes() == before            # nothing of the earlier run was overwritten


def test_resume_after_the_dataset_changed_is_refused(finished, tiny_model_dir, tmp_path):  # noqa: F811
    """The same case ids, one case's new target changed in the file: the edits made so far were of other cases."""
    data, reports = _copy(finished, tmp_path)
    records = json.loads(data.read_text())
    records[1]["requested_rewrite"]["target_new"]["str"] = "Antarctica"
    data.write_text(json.dumps(records))
    proc = _pytest(tiny_model_dir, reports, tmp_path, "--dataset", str(data), "--resume")
    assert proc.returncode == 1, proc.stdout[-3000:]
    msg = _message(reports)
    assert "the cases' content (the dataset file changed?) differ" in msg and "\n" not in msg, msg


def test_key_parts_cover_texts_statistics_and_content(tiny_llama, builtin_cases, tmp_path):
    """The key itself (no run needed): each of the three inputs changes it."""
    from harness.editors import build_editor

    from .conftest import make_stats

    def key(cases, texts, n_tokens):
        editor = build_editor("rome", tiny_llama, ["layer=1"], stats=make_stats(tiny_llama, tmp_path, n_tokens))
        return run_key_parts(tiny_llama, editor, cases, batch_size=1, ppl_schedule="every", wild=False,
                             ppl_texts=texts)

    cases = builtin_cases[:2]
    base = key(cases, ["a", "b"], 4000)
    assert key(cases, ["a", "b"], 4000) == base
    assert key(cases, ["a"], 4000)["ppl_texts"] != base["ppl_texts"]
    assert key(cases, ["a", "b"], 2000)["stats"] != base["stats"]
    changed = [cases[0].with_targets("Antarctica", cases[0].target_true), cases[1]]
    assert [c.case_id for c in changed] == base["case_ids"] and key(changed, ["a", "b"], 4000)["cases"] != base["cases"]
    assert SequentialRun  # the owner of the key (harness/sequential.py)
