"""The pytest plugin: hooks and fixtures only. Options come from the table in ``harness.options``; the fixtures
hand out the session (state), the editor and the test's record; suites measure with ``harness.protocols`` and
assert ``harness.thresholds``' verdicts. Registered through the ``pytest11`` entry point (``knowedit_harness``)."""
from __future__ import annotations

import contextlib
import os
import re
import warnings
from pathlib import Path
from typing import Any

import pytest

from .data import DataError
from .options import (add_options, options_from, read_values, threshold_values, validate_corpora,
                      validate_hparams_files, validate_names)
from .protocols import Measurement
from .run import BenchmarkRun, Record
from .session import HarnessSession, ModelUnavailable
from .thresholds import Thresholds
from .timing import PhaseTimer

pytest_plugins = ["harness.sharding"]    # --shard I/N (docs/cluster.md)
RECORD_KEY = "harness_record"
_SESSION = pytest.StashKey[HarnessSession]()
_RUN = pytest.StashKey[BenchmarkRun]()
_RECORD = pytest.StashKey[Record]()
_HPARAMS_FILES = pytest.StashKey[dict]()        # editor -> what its --hparams-file became (start-up)


def pytest_addoption(parser: pytest.Parser) -> None:
    add_options(parser)


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    from . import hookspec
    pluginmanager.add_hookspecs(hookspec)


def _report_dir(config: pytest.Config) -> str:
    """``--report-dir`` as an absolute path (relative to the rootdir), as parsed at start-up."""
    return config.stash[_SESSION].options.report_dir


def _xdist_worker(config: pytest.Config) -> dict | None:
    return getattr(config, "workerinput", None)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "suite(name): the benchmark suite a test file belongs to (run JSON 'suite')")
    config.addinivalue_line("markers", "cases(spec): parametrize 'case' with another case set (e.g. builtin-hard)")
    worker = _xdist_worker(config)
    if worker is not None:
        _pin_worker_device(worker)
    else:
        _stop_gracefully_on_sigterm(config)
    values = read_values(config)              # every bad value is a usage error here, before anything loads
    options = options_from(values, progress=config.getoption("capture") == "no" or not os.environ.get("CI"))
    validate_names(options)
    if worker is None:
        validate_corpora(options)             # an hf: corpus that cannot be loaded fails here, not mid-run
    with warnings.catch_warnings(record=True) as ignored_keys:   # EasyEdit keys the harness does not use
        warnings.simplefilter("always")
        hparams_files = validate_hparams_files(options.hparams_file)
    for w in ignored_keys:                                      # shown in the warnings summary, once per key
        config.issue_config_time_warning(w.message, stacklevel=2)
    hparams_files = _canonical_editors(options, hparams_files)  # --editor ft runs, and is recorded, as ft_l
    config.stash[_HPARAMS_FILES] = hparams_files                # the provenance of a controller that builds none
    thresholds = Thresholds(**threshold_values(values))
    from .specs import register_builtin_specs
    config.hook.pytest_harness_register_metrics(registry=register_builtin_specs())
    config.stash[_SESSION] = HarnessSession(options, thresholds, progress=_progress(config, worker))
    config.stash[_RUN] = BenchmarkRun(config={
        "editors": options.editors, "model": options.model, "dataset": options.dataset, "n_cases": options.n_cases,
        "data_dir": options.data_dir, "hparam_overrides": options.hparams, "device": options.device,
        "dtype": options.dtype, "wild": options.wild, "fluency": options.fluency,
        "seq_edits": options.seq_edits, "batch_size": options.batch_size, "ppl_schedule": options.ppl_schedule,
        "wild_dataset": options.wild_dataset, "hard_dataset": options.hard_dataset,
        "hparams_files": {e: m.record() for e, m in hparams_files.items()}}, thresholds=thresholds)
    if worker is None:
        baseline = None
        if values["baseline"]:
            from .report import RunFileError, load_run
            try:
                baseline = load_run(values["baseline"])
            except RunFileError as e:
                raise pytest.UsageError(f"--baseline: {e}") from None
        config.pluginmanager.register(RunCollector(config, config.stash[_RUN], baseline), "harness-run-collector")


def _canonical_editors(options: Any, hparams_files: dict[str, Any]) -> dict[str, Any]:
    """Editor aliases resolved once, at start-up (harness/editor_aliases.py): ``--editor ft`` runs as ``ft_l``, so
    its tests, records and provenance carry one name; ``--hparams-file`` keys likewise (two files for one editor
    under two names are a usage error). Returns ``hparams_files`` keyed by canonical names."""
    from .editor_aliases import canonical_editor
    options.editors = list(dict.fromkeys(canonical_editor(e) for e in options.editors))
    out: dict[str, Any] = {}
    for name, mapping in hparams_files.items():
        if canonical_editor(name) in out:
            raise pytest.UsageError(f"--hparams-file {name}=...: a second file for editor {canonical_editor(name)!r} "
                                    f"({name} is another name for it)")
        out[canonical_editor(name)] = mapping
    options.hparams_file = [(canonical_editor(e), path) for e, path in options.hparams_file]
    return out


def _progress(config: pytest.Config, worker: dict | None):
    """Where long steps report: pytest's terminal, past its capture (a bar on a terminal, start and end lines under
    CI or a pipe); nothing from an xdist worker (its output is not shown)."""
    from .progress import Progress, TerminalStream
    if worker is not None:
        return Progress.silent()
    return Progress(TerminalStream(config), bars=False if os.environ.get("CI") else None)


_PREVIOUS_SIGTERM = pytest.StashKey[Any]()


def _terminate_as_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum} (SIGTERM)")


def _stop_gracefully_on_sigterm(config: pytest.Config) -> None:
    """SIGTERM (a cluster preempting the job, ``kill``, a CI timeout) stops the session as Ctrl-C does: pytest
    finishes the session and the run JSON keeps every record already made. Only in the main process's main thread,
    and only over the default action (a launcher's own handler is left alone)."""
    import signal
    import threading
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGTERM"):
        return
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        config.stash[_PREVIOUS_SIGTERM] = signal.signal(signal.SIGTERM, _terminate_as_interrupt)


def pytest_unconfigure(config: pytest.Config) -> None:
    previous = config.stash.get(_PREVIOUS_SIGTERM, None)
    if previous is not None:
        import signal
        signal.signal(signal.SIGTERM, previous)


def _pin_worker_device(worker: dict) -> None:
    """One GPU per xdist worker (gw0 -> GPU 0, ...); on CPU, split the cores between workers."""
    idx = int(worker.get("workerid", "gw0")[2:] or 0)
    n = int(worker.get("workercount", 1))
    import torch
    if "CUDA_VISIBLE_DEVICES" not in os.environ and torch.cuda.device_count() > 1:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(idx % torch.cuda.device_count())
    torch.set_num_threads(max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) // n)))


# --- parametrisation ------------------------------------------------------------------------------------
def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize the suites. A model that cannot be loaded while collecting (the tracing suite parametrizes
    from what the model knows) stops the session in one line, not one collection error per module."""
    try:
        _parametrize(metafunc, metafunc.config.stash[_SESSION])
    except ModelUnavailable:      # remembered by the session; pytest_collection_finish stops with it
        for name in ("fact", "case", "diversity_set"):
            if name in metafunc.fixturenames:
                with contextlib.suppress(ValueError):      # already parametrized before the failure
                    metafunc.parametrize(name, [])


def pytest_collection_finish(session: pytest.Session) -> None:
    harness = session.config.stash.get(_SESSION, None)
    error = harness._load_error if harness is not None else None
    if error is not None:
        pytest.exit(f"the model could not be loaded: {error}", returncode=pytest.ExitCode.USAGE_ERROR)
    if harness is not None and _xdist_worker(session.config) is None:
        harness.plan_single_edits(_single_edits(session.items))


# suites whose (editor, case) tests each make one edit of their case from the unedited model
_SINGLE_EDIT_SUITES = ("single_edit", "hardedit", "locality")


def _single_edits(items: list[pytest.Item]) -> list[tuple[str, Any]]:
    """(editor name, case) of the selected tests that edit one case from the unedited model, in run order: what an
    editor may optimise ahead with ``--vstar-batch`` (under xdist the order of a worker's tests is not known)."""
    out = []
    for item in items:
        marker = item.get_closest_marker("suite")
        params = getattr(getattr(item, "callspec", None), "params", {})
        if marker and marker.args[0] in _SINGLE_EDIT_SUITES and "editor_name" in params and "case" in params:
            out.append((params["editor_name"], params["case"]))
    return out


def _parametrize(metafunc: pytest.Metafunc, session: HarnessSession) -> None:
    if "editor_name" in metafunc.fixturenames:
        metafunc.parametrize("editor_name", session.options.editors, scope="session")
    if "fact" in metafunc.fixturenames:            # tracing suite: known facts
        facts = session.known_facts()
        metafunc.parametrize("fact", facts, ids=[f"{f.source}-{f.case_id}" for f in facts])
    if "sweep_window" in metafunc.fixturenames:    # layer sweep: editing windows
        metafunc.parametrize("sweep_window", session.options.sweep_windows, ids=lambda w: f"w{w}")
    if "diversity_set" in metafunc.fixturenames:  # diversity suite: edit sets differing in target diversity
        try:
            sets = session.diversity_sets()
        except DataError as e:            # one line that stops the session, not a collection traceback
            pytest.exit(f"diversity suite: {e}", returncode=pytest.ExitCode.USAGE_ERROR)
        metafunc.parametrize("diversity_set", list(sets.values()), ids=list(sets))
    if "case" in metafunc.fixturenames:
        marker = metafunc.definition.get_closest_marker("cases")
        spec = marker.args[0] if marker else None
        if spec == "hard":
            spec = session.options.hard_dataset
        elif spec == "wild":
            spec = session.wild_dataset_name()
        cases = (session.known_cases(session.options.known_cases) if spec == "known"
                 else session.cases(spec) if spec else session.cases())
        metafunc.parametrize("case", cases, ids=[c.case_id for c in cases])


# --- fixtures --------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def harness(request: pytest.FixtureRequest) -> HarnessSession:
    """The session's shared state: ``harness.lm``, ``harness.stats``, ``harness.base_perplexity()``, ..."""
    return request.config.stash[_SESSION]


@pytest.fixture(scope="session")
def lm(harness: HarnessSession):
    """The loaded model (model, tokenizer, adapter), loaded once per session."""
    return harness.lm


@pytest.fixture(scope="session")
def editor(harness: HarnessSession, editor_name: str):
    """The editor selected by ``--editor`` (the test is repeated for each)."""
    return harness.editor(editor_name)


class SuiteRecord(Record):
    """The test's record; ``add`` also takes a protocol's :class:`Measurement` (metrics, protocols and info)."""

    def add(self, metrics: dict[str, Any] | Measurement, protocols: dict[str, str] | None = None,
            **protocol_for_all: Any) -> None:
        if isinstance(metrics, Measurement):
            super().add(metrics.metrics, metrics.protocols)
            self.note(**metrics.info)
        else:
            super().add(metrics, protocols, **protocol_for_all)


@pytest.fixture
def record(request: pytest.FixtureRequest, harness: HarnessSession) -> SuiteRecord:
    """The test's benchmark record. The suite names itself with ``pytestmark = pytest.mark.suite("name")``."""
    marker = request.node.get_closest_marker("suite")
    suite = marker.args[0] if marker else request.node.module.__name__.removeprefix("test_")
    params = getattr(request.node, "callspec", None)
    p = params.params if params else {}
    case = p.get("case") or p.get("fact") or p.get("diversity_set")
    rec = SuiteRecord(suite, p.get("editor_name"), getattr(case, "case_id", None), PhaseTimer(harness.lm.device),
                      subject=getattr(case, "subject", None))
    rec.data["model"] = harness.lm.identity
    rec.data["machine"] = harness.machine()
    # the dict is attached now and filled by the test; the call-phase report carries it (also to xdist's controller)
    request.node.user_properties.append((RECORD_KEY, rec.data))
    request.node.stash[_RECORD] = rec
    return rec


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Close the record (timings, memory) before the call-phase report copies it. A model that cannot be loaded
    is reported in one line, once, and stops the session (every later test would fail the same way)."""
    rec = item.stash.get(_RECORD, None)
    if rec is not None and call.when == "call":
        rec.finish()
    report = yield
    if call.excinfo is not None and isinstance(call.excinfo.value, ModelUnavailable):
        report.longrepr = str(call.excinfo.value)
        item.session.shouldstop = f"the model could not be loaded: {call.excinfo.value}"
    elif call.excinfo is not None and isinstance(call.excinfo.value, _one_line_errors()):
        # the harness's own errors name the cause and the fix in their message: that line, not a traceback
        e = call.excinfo.value
        report.longrepr = f"{type(e).__name__}: {' '.join(str(e).split())}"
    return report


def _one_line_errors() -> tuple[type[BaseException], ...]:
    """The harness's error types whose message is the whole story (cause and fix); a failing test shows only it."""
    from .data import DataError
    from .data.pool import PoolError
    from .editing import RestoreError
    from .editors.base import HparamsError, UnknownEditorError
    from .models.adapter import UnknownArchitectureError
    from .models.loading import ModelLoadError
    from .models.structure import StructureError
    from .sequential import ConcurrentRunError, ResumeError
    from .tokens import PromptTooLong
    return (DataError, PoolError, RestoreError, HparamsError, UnknownEditorError, UnknownArchitectureError,
            ModelLoadError, StructureError, ResumeError, ConcurrentRunError, PromptTooLong)


class RunCollector:
    """Lives on the controller (or a plain run): turns test reports into run records and writes the run JSON and
    HTML report at the end. Under xdist the records arrive with the workers' reports."""

    def __init__(self, config: pytest.Config, run: BenchmarkRun, baseline: dict | None = None):
        self.config = config
        self.run = run
        self.baseline = baseline          # a loaded run JSON (--baseline), read before any test runs
        self.comparison = None
        self.paths: list[Path] = []

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        data = next((v for k, v in report.user_properties if k == RECORD_KEY), None)
        if data is None:
            return
        if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
            rec = dict(data)
            rec["nodeid"] = report.nodeid
            rec["outcome"] = ("error" if report.when == "setup" and report.failed else report.outcome)
            rec["message"] = _short_message(report) if report.outcome != "passed" else None
            self.run.add(rec)

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if not self.run.records:
            return
        data = self._run_json()
        if not self.config.getoption("no_report"):
            self._write(data)
        self._compare(session, data)

    def _run_json(self) -> dict:
        """The run JSON, with the provenance of what ran (read off the session; nothing new is loaded)."""
        from .provenance import collect
        try:
            model = next((r.get("model") for r in self.run.records if r.get("model")), None)
            self.run.provenance = collect(self.config.stash[_SESSION], model,
                                          hparams_files=self.config.stash.get(_HPARAMS_FILES, None))
        except Exception as e:  # noqa: BLE001 - the records matter more than their provenance
            self.run.provenance = {"error": f"{type(e).__name__}: {e}"}
        data = self.run.to_json()
        self.config.hook.pytest_harness_update_run_json(config=self.config, run=data)
        return data

    def _write(self, data: dict) -> None:
        """Run JSON, latest.json, the HTML report and latest.html, each written atomically. If the report dir
        cannot be written, the run goes to a fresh temporary folder, and the summary says where."""
        from .run import fallback_report_dir
        report_dir = Path(_report_dir(self.config))
        try:
            path = self.run.write(report_dir, data)
        except OSError as e:            # nothing was published there (both files are written before either is renamed)
            try:
                fallback = fallback_report_dir()
                path = self.run.write(fallback, data)
            except OSError as e2:
                self.paths.append(Path(f"(the run JSON could not be written: report dir {report_dir}: "
                                       f"{e.strerror or e}; temporary folder: {e2.strerror or e2}; its results are "
                                       "only in this summary)"))
                return
            self.paths.append(Path(f"(report dir {report_dir} cannot be written: {e.strerror or e}; the run JSON "
                                   f"could not be written there and was written to {fallback} instead)"))
            report_dir = fallback
        self.paths.append(path)
        try:
            from .report.html import render_html
            from .run import atomic_write_text
            html = render_html(data)
            self.paths.append(atomic_write_text(path.with_suffix(".html"), html))
            atomic_write_text(report_dir / "latest.html", html)
        except Exception as e:  # noqa: BLE001 - the JSON is written; a report problem must not lose it
            self.paths.append(Path(f"(HTML report failed: {type(e).__name__}: {e})"))

    def _compare(self, session: pytest.Session, data: dict) -> None:
        """``--baseline``: compare with a saved run; a regression fails the session (exit code 1); a baseline of
        another model, dataset or thresholds is refused (exit code 4, a usage error)."""
        if self.baseline is None:
            return
        from .report.compare import compare
        self.comparison = compare(self.baseline, data)
        if self.comparison.refused:
            session.exitstatus = pytest.ExitCode.USAGE_ERROR
        elif self.comparison.regressions and session.exitstatus == 0:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter) -> None:
        tr = _SafeTerminal(terminalreporter)     # run-provided text (ids, subjects, names, messages)
        comparison = self.comparison
        if comparison is not None:
            tr.section("comparison with baseline")
            if comparison.refused:
                tr.write_line(f"comparison with {self.config.getoption('baseline')} refused: {comparison.refused}")
            else:
                tr.write_line(comparison.to_markdown(only_changes=True))
                tr.write_line(f"{len(comparison.regressions)} regression(s) against {self.config.getoption('baseline')}")
        if not self.run.records:
            return
        from .metrics.registry import summarize
        from .report.export import to_text
        tr.section("knowledge-editing benchmark")
        tr.write_line("mean [95% bootstrap CI over cases]; phase times: median s per record (a sequential record: "
                      "its whole stream); edits to collapse: the fewest over the sequential streams ('never': none "
                      "collapsed)")
        for line in to_text(summarize(sorted(self.run.records, key=lambda r: r.get("nodeid", "")))):
            tr.write_line(line)
        cases = getattr(self.config.stash[_SESSION], "_cases", None)
        skipped = getattr(cases, "skip_summary", lambda: None)()
        if skipped:
            tr.write_line(f"--skip-invalid: {skipped} (listed in the run JSON's provenance.dataset.skipped)")
        for p in self.paths:
            tr.write_line(f"report: {p}")


# C0 and C1 control characters (ESC starts ANSI sequences; CR, BS rewrite the line) and the bidirectional overrides:
# text from a run (case ids, subjects, editor names, messages, paths) is shown escaped, never acted on by a terminal
_CONTROL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def terminal_safe(text: Any) -> str:
    """``text`` for the terminal: every control character (newlines aside) as its Python escape (``\\x1b``)."""
    return _CONTROL.sub(lambda m: m.group(0).encode("unicode_escape").decode("ascii"), str(text))


class _SafeTerminal:
    """The terminal reporter with every line passed through :func:`terminal_safe`."""

    def __init__(self, tr: Any):
        self._tr = tr

    def section(self, title: str, *args: Any, **kw: Any) -> None:
        self._tr.section(terminal_safe(title), *args, **kw)

    def write_line(self, line: Any, **kw: Any) -> None:
        self._tr.write_line(terminal_safe(line), **kw)


def _short_message(report: pytest.TestReport) -> str:
    if report.skipped and isinstance(report.longrepr, tuple):
        return str(report.longrepr[2])
    crash = getattr(report.longrepr, "reprcrash", None)
    return crash.message.splitlines()[0] if crash is not None else str(report.longrepr).splitlines()[-1]
