"""The pytest plugin: options, fixtures and hooks. Thin: it builds a HarnessSession and a BenchmarkRun and hands
everything to them. Registered through the ``pytest11`` entry point (``knowedit_harness``)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from .run import BenchmarkRun, Record, Thresholds
from .session import HarnessSession, Options
from .timing import PhaseTimer

pytest_plugins = ["harness.sharding"]    # --shard I/N (docs/cluster.md)
RECORD_KEY = "harness_record"
_SESSION = pytest.StashKey[HarnessSession]()
_RUN = pytest.StashKey[BenchmarkRun]()
_RECORD = pytest.StashKey[Record]()


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    from . import hookspec
    pluginmanager.add_hookspecs(hookspec)


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("harness", "knowledge-editing benchmark")
    g.addoption("--editor", action="append", default=None, metavar="NAME",
                help="editor to benchmark (repeatable); default: rome, memit, ft")
    g.addoption("--model", default=os.environ.get("HARNESS_MODEL", "smollm2-135m"),
                help="hub id, local directory, .gguf file, or smollm2-135m (the embedded default)")
    g.addoption("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    g.addoption("--dtype", default="float32", help="float32, bfloat16 or float16")
    g.addoption("--device-map", default=None, help="accelerate device_map for models larger than one GPU (e.g. auto)")
    g.addoption("--arch-override", default=None,
                help="module names for an unknown architecture: 'layers=...{},mlp_out=...{},attn_out=...{},embed=...'")
    g.addoption("--trust-remote-code", action="store_true", default=False)
    g.addoption("--data-dir", default=os.environ.get("HARNESS_DATA_DIR"),
                help="folder with the benchmark data (counterfact/, zsre/, collapse/, corpus/); env HARNESS_DATA_DIR")
    g.addoption("--dataset", default="auto",
                help="auto (counterfact with a data dir, else builtin), builtin, builtin-hard, counterfact, zsre, "
                     "counterfact-easyedit, a file, or hf:owner/name")
    g.addoption("--cases", type=int, default=None, help="number of cases (default: harness_cases ini, 10)")
    g.addoption("--skip-invalid", action="store_true", default=False, help="skip malformed records instead of failing")
    g.addoption("--ppl-corpus", default="auto", help="perplexity texts: auto (ME-PPL_50 with a data dir, else builtin)")
    g.addoption("--ppl-texts", type=int, default=50, help="number of perplexity texts")
    g.addoption("--stats-corpus", default="auto", help="text for key statistics: auto (WikiText with a data dir)")
    g.addoption("--stats-tokens", type=int, default=100_000, help="tokens for key second-moment statistics")
    g.addoption("--cache-dir", default=None, help="cache for de-quantized models and statistics (env HARNESS_CACHE_DIR)")
    g.addoption("--hparam", action="append", default=[], metavar="[EDITOR.]KEY=VALUE",
                help="override a hyper-parameter, e.g. --hparam rome.layer=6")
    g.addoption("--collapse-ratio", type=float, default=None,
                help="perplexity ratio counted as collapse (default: harness_collapse_ratio ini, 2.0)")
    g.addoption("--min-efficacy", type=float, default=None, help="minimum efficacy success of an edit (default 1.0)")
    g.addoption("--report-dir", default="reports", help="where the run JSON and HTML report go")
    g.addoption("--seq-edits", type=int, default=10, help="sequential suite: number of edits (default 10)")
    g.addoption("--batch-size", type=int, default=1, help="sequential suite: edits per editor call (MEMIT, ...)")
    g.addoption("--ppl-schedule", default="every", help="sequential suite: perplexity after every, every:K or "
                                                        "geometric edit counts")
    g.addoption("--resume", action="store_true", default=False,
                help="sequential suite: continue an interrupted run from its journal in REPORT_DIR/sequential")
    g.addoption("--hard-dataset", default="builtin-hard",
                help="HardEdit suite cases: builtin-hard, or a HardEdit-format file (EasyEdit-style records)")
    g.addoption("--no-report", action="store_true", default=False, help="write no run JSON / HTML")
    g.addoption("--baseline", default=None, metavar="RUN.json",
                help="compare this run with a saved run JSON (harness compare); a regression fails the session")
    # locality and downstream suites
    g.addoption("--min-neighborhood", type=float, default=None,
                help="locality suite: minimum neighbourhood success after an edit (default: ini, 0.5)")
    g.addoption("--max-kl", type=float, default=None,
                help="locality suite: maximum mean KL(pre || post) on unrelated text, nats (default: ini, 0.05)")
    g.addoption("--max-top1-changed", type=float, default=None,
                help="locality suite: maximum fraction of unrelated-text top-1 tokens changed (default: ini, 0.05)")
    g.addoption("--min-qa-locality", type=float, default=None,
                help="locality suite: minimum zsRE/EasyEdit QA locality (default: ini, 0.5)")
    g.addoption("--max-accuracy-drop", type=float, default=None,
                help="downstream suite: maximum accuracy drop per task (default: ini, 0.1)")
    g.addoption("--downstream-tasks", default=None, metavar="T1,T2",
                help="downstream suite: lm-eval tasks from harness/downstream/tasks, or all "
                     "(default: ini, boolq,piqa,arc_challenge)")
    g.addoption("--downstream-limit", type=int, default=None,
                help="downstream suite: examples per task, 0 for all (default: ini, 20)")
    g.addoption("--corr-edits", type=int, default=3,
                help="downstream suite: sequential hard edits for the perplexity-accuracy correlation (default 3)")
    # localization suites: causal tracing, layer sweep, the five editing problems (docs/localization.md)
    g.addoption("--known-facts", default="auto",
                help="tracing suite: known (ROME's known_1000.json in the data dir), builtin-known, or a file; "
                     "auto: known with a data dir")
    g.addoption("--trace-facts", type=int, default=10, help="tracing suite: known facts to trace (0: all)")
    g.addoption("--trace-noise", type=float, default=3.0,
                help="tracing: noise std as a multiple of the input embeddings' std (ROME: 3)")
    g.addoption("--trace-samples", type=int, default=10, help="tracing: noise draws per fact (ROME: 10)")
    g.addoption("--trace-window", type=int, default=10, help="tracing: layers restored together for mlp/attn")
    g.addoption("--known-cases", type=int, default=4,
                help="editing-problems suite: cases of the dataset whose true answer the model knows (0: all)")
    g.addoption("--sweep-layers", default="every:6", help="layer sweep: every:K, all, or a comma list of layers")
    g.addoption("--sweep-windows", default="1", metavar="W1,W2",
                help="layer sweep: editing windows (1: ROME/FT-L at one layer; >1: MEMIT/FT-L over the window)")
    g.addoption("--sweep-facts", type=int, default=3, help="layer sweep: known cases edited at every layer")
    g.addoption("--min-trace-drop", type=float, default=None,
                help="tracing: share of P(answer) the subject noise must remove (default: ini, 0.5)")
    g.addoption("--min-rewrite-score", type=float, default=None,
                help="editing problems: minimum rewrite score (default: ini, 0.5)")
    g.addoption("--min-sweep-success", type=float, default=None,
                help="layer sweep: minimum mean edit success at the best layer (default: ini, 0.5)")
    parser.addini("harness_min_trace_drop", "tracing: share of P(answer) the noise must remove", default="0.5")
    parser.addini("harness_min_rewrite_score", "editing problems: minimum rewrite score", default="0.5")
    parser.addini("harness_min_sweep_success", "layer sweep: minimum edit success at the best layer", default="0.5")
    parser.addini("harness_collapse_ratio", "perplexity ratio counted as collapse", default="2.0")
    parser.addini("harness_min_efficacy", "minimum efficacy success of a single edit", default="1.0")
    parser.addini("harness_cases", "default number of cases", default="10")
    parser.addini("harness_min_neighborhood", "minimum neighbourhood success (locality suite)", default="0.5")
    parser.addini("harness_max_kl", "maximum KL on unrelated text, nats (locality suite)", default="0.05")
    parser.addini("harness_max_top1_changed", "maximum fraction of changed top-1 tokens (locality suite)",
                  default="0.05")
    parser.addini("harness_min_qa_locality", "minimum QA locality (locality suite)", default="0.5")
    parser.addini("harness_max_accuracy_drop", "maximum downstream accuracy drop per task", default="0.1")
    parser.addini("harness_downstream_tasks", "downstream tasks (comma-separated)", default="boolq,piqa,arc_challenge")
    parser.addini("harness_downstream_limit", "examples per downstream task (0: all)", default="20")


def _thresholds(config: pytest.Config) -> Thresholds:
    def pick(opt: str, ini: str) -> float:
        v = config.getoption(opt)
        return float(v if v is not None else config.getini(ini))
    return Thresholds(collapse_ppl_ratio=pick("collapse_ratio", "harness_collapse_ratio"),
                      min_efficacy=pick("min_efficacy", "harness_min_efficacy"),
                      min_neighborhood=pick("min_neighborhood", "harness_min_neighborhood"),
                      max_kl=pick("max_kl", "harness_max_kl"),
                      max_top1_changed=pick("max_top1_changed", "harness_max_top1_changed"),
                      min_qa_locality=pick("min_qa_locality", "harness_min_qa_locality"),
                      max_accuracy_drop=pick("max_accuracy_drop", "harness_max_accuracy_drop"),
                      min_trace_drop=pick("min_trace_drop", "harness_min_trace_drop"),
                      min_rewrite_score=pick("min_rewrite_score", "harness_min_rewrite_score"),
                      min_sweep_success=pick("min_sweep_success", "harness_min_sweep_success"))


def _options(config: pytest.Config) -> Options:
    o = config.getoption
    cases = o("cases") if o("cases") is not None else int(config.getini("harness_cases"))
    return Options(editors=o("editor") or ["rome", "memit", "ft"], model=o("model"), device=o("device"),
                   dtype=o("dtype"), device_map=o("device_map"), arch_override=o("arch_override"),
                   trust_remote_code=o("trust_remote_code"), data_dir=o("data_dir"), dataset=o("dataset"),
                   n_cases=cases if cases > 0 else None, skip_invalid=o("skip_invalid"), ppl_corpus=o("ppl_corpus"),
                   ppl_texts=o("ppl_texts"), stats_corpus=o("stats_corpus"), stats_tokens=o("stats_tokens"),
                   cache_dir=o("cache_dir"), hparams=o("hparam"), report_dir=_report_dir(config),
                   seq_edits=o("seq_edits"), batch_size=o("batch_size"), ppl_schedule=o("ppl_schedule"),
                   resume=o("resume"), hard_dataset=o("hard_dataset"),
                   downstream_tasks=(o("downstream_tasks") or config.getini("harness_downstream_tasks")).split(","),
                   downstream_limit=_downstream_limit(config), corr_edits=o("corr_edits"),
                   known_facts=o("known_facts"), trace_facts=o("trace_facts") or None, trace_noise=o("trace_noise"),
                   trace_samples=o("trace_samples"), trace_window=o("trace_window"),
                   known_cases=o("known_cases") or None, sweep_layers=o("sweep_layers"),
                   sweep_windows=_sweep_windows(o("sweep_windows")), sweep_facts=o("sweep_facts") or None,
                   progress=config.getoption("capture") == "no" or not os.environ.get("CI"))


def _downstream_limit(config: pytest.Config) -> int | None:
    v = config.getoption("downstream_limit")
    v = int(v if v is not None else config.getini("harness_downstream_limit"))
    return v if v > 0 else None


def _sweep_windows(spec: str) -> list[int]:
    try:
        windows = [int(w) for w in str(spec).split(",") if w.strip()]
    except ValueError:
        raise pytest.UsageError(f"--sweep-windows {spec}: expected integers such as 1,3") from None
    if not windows or min(windows) < 1:
        raise pytest.UsageError(f"--sweep-windows {spec}: windows must be >= 1")
    return windows


def _report_dir(config: pytest.Config) -> str:
    d = Path(config.getoption("report_dir"))
    return str(d if d.is_absolute() else Path(config.rootpath) / d)


def _xdist_worker(config: pytest.Config) -> dict | None:
    return getattr(config, "workerinput", None)


def pytest_configure(config: pytest.Config) -> None:
    worker = _xdist_worker(config)
    if worker is not None:
        _pin_worker_device(worker)
    from .editors import registry  # registers the built-in editors
    options = _options(config)
    known = registry.names()
    for name in options.editors:
        if name not in known:
            raise pytest.UsageError(f"--editor {name}: unknown editor; available: {', '.join(known)}")
    from .editors.base import HparamsError, validate_overrides
    try:
        validate_overrides(options.hparams, options.editors)
    except HparamsError as e:
        raise pytest.UsageError(str(e)) from None
    from .downstream.evaluator import UnknownTaskError, parse_tasks
    try:
        options.downstream_tasks = parse_tasks(options.downstream_tasks)
    except UnknownTaskError as e:
        raise pytest.UsageError(f"--downstream-tasks: {e}") from None
    thresholds = _thresholds(config)
    config.stash[_SESSION] = HarnessSession(options, thresholds)
    config.stash[_RUN] = BenchmarkRun(config={
        "editors": options.editors, "model": options.model, "dataset": options.dataset, "n_cases": options.n_cases,
        "data_dir": options.data_dir, "hparam_overrides": options.hparams, "device": options.device,
        "dtype": options.dtype}, thresholds=thresholds)
    config.addinivalue_line("markers", "suite(name): the benchmark suite a test file belongs to (run JSON 'suite')")
    config.addinivalue_line("markers", "cases(spec): parametrize 'case' with another case set (e.g. builtin-hard)")
    if worker is None:
        baseline = None
        if config.getoption("baseline"):
            from .report import RunFileError, load_run
            try:
                baseline = load_run(config.getoption("baseline"))
            except RunFileError as e:
                raise pytest.UsageError(f"--baseline: {e}") from None
        config.pluginmanager.register(RunCollector(config, config.stash[_RUN], baseline), "harness-run-collector")


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
    session = metafunc.config.stash[_SESSION]
    if "editor_name" in metafunc.fixturenames:
        metafunc.parametrize("editor_name", session.options.editors, scope="session")
    if "fact" in metafunc.fixturenames:            # tracing suite: known facts
        facts = session.known_facts()
        metafunc.parametrize("fact", facts, ids=[f"{f.source}-{f.case_id}" for f in facts])
    if "sweep_window" in metafunc.fixturenames:    # layer sweep: editing windows
        metafunc.parametrize("sweep_window", session.options.sweep_windows, ids=lambda w: f"w{w}")
    if "case" in metafunc.fixturenames:
        marker = metafunc.definition.get_closest_marker("cases")
        spec = marker.args[0] if marker else None
        if spec == "hard":
            spec = session.options.hard_dataset
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


@pytest.fixture
def record(request: pytest.FixtureRequest, harness: HarnessSession) -> Record:
    """The test's benchmark record. The suite names itself with ``pytestmark = pytest.mark.suite("name")``."""
    marker = request.node.get_closest_marker("suite")
    suite = marker.args[0] if marker else request.node.module.__name__.removeprefix("test_")
    params = getattr(request.node, "callspec", None)
    p = params.params if params else {}
    case = p.get("case") or p.get("fact")
    rec = Record(suite, p.get("editor_name"), getattr(case, "case_id", None), PhaseTimer(harness.lm.device),
                 subject=getattr(case, "subject", None))
    rec.data["model"] = harness.lm.identity
    rec.data["machine"] = harness.machine()
    # the dict is attached now and filled by the test; the call-phase report carries it (also to xdist's controller)
    request.node.user_properties.append((RECORD_KEY, rec.data))
    request.node.stash[_RECORD] = rec
    return rec


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    """Close the record (timings, memory) before the call-phase report copies it."""
    rec = item.stash.get(_RECORD, None)
    if rec is not None and call.when == "call":
        rec.finish()
    return (yield)


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
        if not self.config.getoption("no_report"):
            self._write()
        self._compare(session)

    def _write(self) -> None:
        report_dir = Path(_report_dir(self.config))
        path = self.run.write(report_dir, update=lambda run: self.config.hook.pytest_harness_update_run_json(
            config=self.config, run=run))
        self.paths.append(path)
        try:
            from .report.html import write_html
            import json
            data = json.loads(path.read_text())
            html = write_html(data, path.with_suffix(".html"))
            latest = report_dir / "latest.html"
            latest.write_text(html.read_text())
            self.paths.append(html)
        except Exception as e:  # noqa: BLE001 - the JSON is written; a report problem must not lose it
            self.paths.append(Path(f"(HTML report failed: {e})"))

    def _compare(self, session: pytest.Session) -> None:
        """``--baseline``: compare with a saved run; a regression fails the session (exit code 1)."""
        if self.baseline is None:
            return
        from .report.compare import compare
        self.comparison = compare(self.baseline, self.run.to_json())
        if self.comparison.regressions and session.exitstatus == 0:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter) -> None:
        comparison = self.comparison
        if comparison is not None:
            terminalreporter.section("comparison with baseline")
            terminalreporter.write_line(comparison.to_markdown(only_changes=True))
            terminalreporter.write_line(f"{len(comparison.regressions)} regression(s) against "
                                        f"{self.config.getoption('baseline')}")
        if not self.run.records:
            return
        tr = terminalreporter
        tr.section("knowledge-editing benchmark")
        cols = [("efficacy_success", "ES"), ("paraphrase_success", "PS"), ("neighborhood_success", "NS"),
                ("ppl_ratio", "ppl x"), ("edits_to_collapse", "collapse@")]
        summary = self.run.summary()
        tr.write_line(f"{'editor/suite':28} {'n':>4} {'pass':>5} " + " ".join(f"{h:>9}" for _, h in cols)
                      + f" {'edit s':>8} {'eval s':>8} {'ppl s':>8}")
        for key, s in summary.items():
            vals = " ".join(f"{s[k]:9.3f}" if isinstance(s.get(k), float) else f"{'-':>9}" for k, _ in cols)
            t = " ".join(f"{s.get(f'time_{p}_s', float('nan')):8.2f}" for p in ("edit", "evaluate", "perplexity"))
            tr.write_line(f"{key:28} {s['n']:>4} {s['passed']:>5} {vals} {t}")
        for p in self.paths:
            tr.write_line(f"report: {p}")


def _short_message(report: pytest.TestReport) -> str:
    if report.skipped and isinstance(report.longrepr, tuple):
        return str(report.longrepr[2])
    crash = getattr(report.longrepr, "reprcrash", None)
    return crash.message.splitlines()[0] if crash is not None else str(report.longrepr).splitlines()[-1]
