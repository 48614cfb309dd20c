"""The option table: one row per command-line option (name, parser, default, ini key, help). From it come the
plugin's ``addoption`` and ``addini`` calls, the :class:`Options` dataclass (run settings) and the threshold values
of :class:`harness.thresholds.Thresholds`. Every value goes through its row's parser when pytest starts, so a bad
value is a usage error (exit 4) of one line naming the option and what it accepts, before any model is loaded.

Precedence per option: command line, then the ini key ``harness_<name>`` (rows with ``ini=True``), then an
environment variable (rows with ``env``), then the default.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from typing import Any

import pytest

from .models.loading import DEFAULT_MODEL, DTYPES


class OptionError(ValueError):
    """A value an option's parser rejects; the message says what the option accepts."""


# --- parsers: str -> value, or OptionError naming what is accepted -----------------------------------------
Parser = Callable[[str], Any]


def text(raw: str) -> str:
    return str(raw)


def boolean(raw: Any) -> bool:
    """A switch's value from the command line (already a bool), an ini file or the environment (true/false...)."""
    if isinstance(raw, bool):
        return raw
    s = str(raw).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise OptionError("expected true or false")


def hparams_file(raw: str) -> tuple[str, str]:
    """``EDITOR=PATH.yaml``: an EasyEdit hyper-parameter file for one editor (the file itself is read at start-up
    by ``validate_names``, once the editor names are known)."""
    from .editors.base import HparamsError
    from .editors.easyedit_hparams import parse_hparams_file_option
    try:
        editor, path = parse_hparams_file_option(raw)
    except HparamsError as e:
        raise OptionError(str(e).split(": ", 1)[-1]) from None
    return editor, str(path)


def integer(minimum: int = 1, allow_all: bool = False) -> Parser:
    """An integer >= ``minimum``; with ``allow_all`` also ``all`` (-> None: no limit)."""
    accepted = f"an integer >= {minimum}" + (" or all" if allow_all else "")

    def parse(raw: str) -> int | None:
        s = str(raw).strip()
        if allow_all and s.lower() == "all":
            return None
        try:
            value = int(s)
        except ValueError:
            raise OptionError(f"expected {accepted}") from None
        if value < minimum:
            raise OptionError(f"expected {accepted}" + (" (use all for every one)" if allow_all else ""))
        return value
    return parse


def auto_or(parse_value: Parser, accepted: str) -> Parser:
    """``auto`` (-> None: the harness chooses) or a value of ``parse_value``."""
    def parse(raw: str) -> Any:
        if str(raw).strip().lower() == "auto":
            return None
        try:
            return parse_value(raw)
        except OptionError:
            raise OptionError(f"expected auto or {accepted}") from None
    return parse


def number(minimum: float = 0.0, exclusive: bool = False) -> Parser:
    """A number >= ``minimum`` (> with ``exclusive``); inf is allowed (a bound that never fails), nan is not."""
    accepted = f"a number {'>' if exclusive else '>='} {minimum:g}"

    def parse(raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise OptionError(f"expected {accepted}") from None
        if math.isnan(value) or value < minimum or (exclusive and value == minimum):
            raise OptionError(f"expected {accepted}")
        return value
    return parse


def choice(*names: str) -> Parser:
    def parse(raw: str) -> str:
        if raw not in names:
            raise OptionError(f"use one of {', '.join(names)}")
        return raw
    return parse


def comma_list(raw: str) -> list[str]:
    items = [x.strip() for x in str(raw).split(",") if x.strip()]
    if not items:
        raise OptionError("expected a comma-separated list")
    return items


def int_list(raw: str) -> list[int]:
    """A comma list of integers >= 1 (``--sweep-windows 1,3``)."""
    try:
        items = [int(x) for x in comma_list(raw)]
    except ValueError:
        raise OptionError("expected integers >= 1 separated by commas, such as 1,3") from None
    if min(items) < 1:
        raise OptionError("expected integers >= 1 separated by commas, such as 1,3")
    return items


_SCHEDULE = re.compile(r"every|every:[1-9][0-9]*|geometric")
_LAYERS = re.compile(r"all|every:[1-9][0-9]*|-?[0-9]+(,-?[0-9]+)*")


def diversity_kinds(raw: str) -> list[str]:
    """A comma list of the diversity suite's edit sets (harness.data.diversity.KINDS), or all."""
    from .data.diversity import KINDS

    items = comma_list(raw)
    if items == ["all"]:
        return list(KINDS)
    bad = [k for k in items if k not in KINDS]
    if bad:
        raise OptionError(f"unknown set {bad[0]!r}; use some of {', '.join(KINDS)} (comma-separated) or all")
    return [k for k in KINDS if k in items]


def ppl_schedule(raw: str) -> str:
    if not _SCHEDULE.fullmatch(str(raw).strip()):
        raise OptionError("use every, every:K (K >= 1) or geometric")
    return str(raw).strip()


def layer_spec(raw: str) -> str:
    """Syntax only: whether each layer exists in the model is checked once the model is loaded."""
    spec = str(raw).replace(" ", "")
    if not _LAYERS.fullmatch(spec):
        raise OptionError("use every:K (K >= 1), all, or a comma list of layers such as 0,5,10")
    return spec


def device(raw: str) -> str:
    """auto, cpu, cuda, cuda:N (only where torch sees that GPU) or mps (only where available)."""
    import torch

    s = str(raw).strip()
    if s in ("auto", "cpu"):
        return s
    m = re.fullmatch(r"cuda(?::([0-9]+))?", s)
    if m:
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise OptionError("CUDA is not available on this machine (torch.cuda.is_available() is False); "
                              "use cpu or auto")
        if m.group(1) is not None and int(m.group(1)) >= n:
            raise OptionError(f"this machine has {n} CUDA device(s); use cuda:0..cuda:{n - 1}")
        return s
    if s == "mps":
        if not torch.backends.mps.is_available():
            raise OptionError("MPS is not available on this machine; use cpu or auto")
        return s
    raise OptionError("use auto, cpu, cuda, cuda:N or mps")


def writable_dir(raw: str) -> str:
    """A folder that exists and can be written, or can be created: its nearest existing ancestor is a writable
    folder. Nothing is created here (a temporary file is written and removed to prove it)."""
    path = Path(raw).expanduser().absolute()
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise OptionError(f"{probe} is a file, not a folder; choose another --report-dir")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise OptionError(f"{probe} cannot be written ({e.strerror or e}); choose a writable folder") from None
    return str(path)


def shard(raw: str) -> tuple[int, int]:
    """``I/N`` -> (I, N): shard I (1-based) of N (harness/sharding.py)."""
    try:
        i, n = (int(p) for p in str(raw).split("/"))
    except ValueError:
        raise OptionError("expected I/N such as 1/3 (shard I of N, I from 1)") from None
    if n < 1 or not 1 <= i <= n:
        raise OptionError(f"I must be between 1 and N, and N >= 1 (e.g. 1/{max(n, 1)})")
    return i, n


def corpus(raw: str) -> str:
    """A corpus spec (harness.data.corpus.load_texts); an ``hf:`` one's syntax is checked here, whether it can be
    loaded by :func:`validate_corpora` at start-up."""
    s = str(raw)
    if s.startswith("hf:"):
        from .data.hub import hf_spec
        from .data.loaders import DataError
        try:
            hf_spec(s, label="")
        except DataError as e:
            raise OptionError(str(e)) from None
    return s


def run_json_file(raw: str) -> str:
    """An existing file (its content is read, and checked, where it is used)."""
    if not Path(raw).expanduser().is_file():
        raise OptionError("no such file; pass an earlier run JSON (reports/run-<id>.json or a merged sweep)")
    return str(Path(raw).expanduser())


# --- the table ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Opt:
    """One option. ``dest`` names the :class:`Options` field (or the threshold); ``kind`` is ``value``, ``flag``
    (store_true), ``switch`` (``--name`` / ``--no-name``, default ``default``) or ``append`` (repeatable, each item
    parsed)."""

    dest: str
    parse: Parser
    default: Any
    help: str
    ini: bool = False
    env: str | None = None
    kind: str = "value"
    threshold: str | None = None      # the Thresholds field this option sets (else an Options field)
    metavar: str | None = None
    type: Any = Any

    @property
    def flag(self) -> str:
        return "--" + self.dest.replace("_", "-")

    @property
    def ini_key(self) -> str:
        return f"harness_{self.dest}"


def _t(dest: str, field_name: str, default: float, help: str, parse: Parser = number()) -> Opt:
    """A threshold row: an option and an ini key, its value a field of Thresholds."""
    return Opt(dest, parse, default, help, ini=True, threshold=field_name, type=float)


OPTIONS: tuple[Opt, ...] = (
    Opt("editor", text, ["rome", "memit", "ft"], "editor to benchmark (repeatable)", kind="append",
        metavar="NAME", type=list),
    Opt("model", text, DEFAULT_MODEL, "hub id, local directory, .gguf file, or smollm2-135m (the embedded default)",
        env="HARNESS_MODEL", type=str),
    Opt("device", device, "auto", "auto, cpu, cuda, cuda:N or mps", type=str),
    Opt("dtype", choice(*DTYPES), "float32", f"{', '.join(DTYPES)}", type=str),
    Opt("device_map", text, None, "accelerate device_map for models larger than one GPU (e.g. auto)",
        type=str | None),
    Opt("arch_override", text, None,
        "module names for an unknown architecture: 'layers=...{},mlp_out=...{},attn_out=...{},embed=...'",
        type=str | None),
    Opt("trust_remote_code", bool, False, "let transformers run the model repository's code", kind="flag", type=bool),
    Opt("data_dir", text, None, "folder with the benchmark data (counterfact/, zsre/, collapse/, corpus/)",
        env="HARNESS_DATA_DIR", type=str | None),
    Opt("dataset", text, "auto", "auto (counterfact with a data dir, else builtin), builtin, builtin-hard, "
        "counterfact, zsre, zsre-qa, counterfact-easyedit, qaedit (from the data dir), knowedit:FILE, a file (its "
        "format sniffed: CounterFact, zsRE, EasyEdit, KnowEdit or QAEdit records), or hf:owner/name", type=str),
    Opt("cases", integer(1, allow_all=True), 10, "number of cases: N >= 1 or all", ini=True, type=int | None),
    Opt("skip_invalid", bool, False, "skip malformed records instead of failing", kind="flag", type=bool),
    Opt("ppl_corpus", corpus, "auto", "perplexity texts: auto (ME-PPL_50 with a data dir, else builtin), a named "
        "corpus or file, or hf:NAME[:CONFIG[:SPLIT[:COLUMN]]] (Hugging Face datasets: a hub id, or a folder saved "
        "with save_to_disk; docs/hf-corpora.md)", type=str),
    Opt("ppl_texts", integer(1, allow_all=True), 50, "number of perplexity texts: N >= 1 or all", type=int | None),
    Opt("stats_corpus", corpus, "auto", "text for key statistics: auto (WikiText with a data dir, else "
        "model-samples: text sampled from the model), a named corpus or file, or "
        "hf:NAME[:CONFIG[:SPLIT[:COLUMN]]] (Hugging Face datasets, e.g. hf:wikitext:wikitext-103-raw-v1, or a "
        "folder saved with save_to_disk; docs/hf-corpora.md)", type=str),
    Opt("stats_tokens", auto_or(integer(1), "an integer >= 1"), None, "tokens for the keys' second-moment "
        "statistics: auto (20 x d_in of model samples, 30,720 for the embedded model; 100,000 of a text corpus) or "
        "N >= 1", type=int | None, metavar="auto|N"),
    Opt("train_pool", text, "auto", "training edits for in-context demonstrations (ike) and unrelated rows (wise): "
        "auto (CounterFact's EasyEdit train split with a data dir, else builtin), builtin, or a train JSON",
        type=str),
    Opt("cache_dir", text, None, "cache for de-quantized models and statistics (default ~/.cache/knowedit-harness)",
        env="HARNESS_CACHE_DIR", type=str | None),
    Opt("hparam", text, [], "override a hyper-parameter, e.g. --hparam rome.layer=6 (repeatable)", kind="append",
        metavar="[EDITOR.]KEY=VALUE", type=list),
    Opt("hparams_file", hparams_file, [], "an EasyEdit hyper-parameter YAML for one editor, mapped onto its "
        "hyper-parameters and recorded in the run (repeatable; --hparam still overrides)", kind="append",
        metavar="EDITOR=PATH.yaml", type=list),
    # evaluation in the wild and generation metrics (docs/wild.md)
    Opt("wild", boolean, False, "WILD metrics (greedy generation, natural stop, exact match / containment) beside "
        "the teacher-forced ones in the single-edit, sequential and locality suites (off by default: on CPU they "
        "cost more than the edit; tox -e bench-full turns them on)",
        ini=True, kind="switch", type=bool),
    Opt("fluency", boolean, False, "ROME's generation fluency (n-gram entropy) and consistency (TF-IDF) before and "
        "after single edits (off by default, like --wild)", ini=True, kind="switch", type=bool),
    Opt("wild_dataset", text, "auto", "WILD suite cases: auto (qaedit with a data dir, else the run's dataset), or "
        "any --dataset value", type=str),
    Opt("report_dir", writable_dir, "reports", "where the run JSON, HTML report and sequential journals go",
        type=str),
    Opt("no_report", bool, False, "write no run JSON / HTML", kind="flag", type=bool),
    Opt("baseline", text, None, "compare this run with a saved run JSON; a regression fails the session",
        metavar="RUN.json", type=str | None),
    # sequential and HardEdit suites
    Opt("seq_edits", integer(1), 10, "sequential suite: number of edits", type=int),
    Opt("batch_size", integer(1), 1, "sequential suite: edits per editor call (MEMIT, ...)", type=int),
    Opt("vstar_batch", integer(1), 1, "target values (v*, z) of up to K cases optimised in one batched pass: "
        "a MEMIT-family edit of several cases in chunks of K, and in the single-edit, HardEdit and locality suites "
        "the next K single edits' v* at the first one's unedited model (1, the default: one case at a time; slower "
        "on CPU at one thread, docs/speed.md; results equal within float rounding)", metavar="K", type=int),
    Opt("ppl_schedule", ppl_schedule, "every", "sequential suite: perplexity after every, every:K or geometric "
        "edit counts", type=str),
    Opt("probe_every", integer(0), 0, "sequential suite: every K edits, score a random sample of the edits made "
        "so far both teacher-forced and in the wild (greedy generation; the Mirage protocol); 0, the default: off",
        metavar="K", type=int),
    Opt("probe_size", integer(1), 20, "sequential suite: edits sampled by each --probe-every probe", metavar="S",
        type=int),
    Opt("resume", bool, False, "sequential suite: continue an interrupted run from its journal in "
        "REPORT_DIR/sequential", kind="flag", type=bool),
    Opt("hard_dataset", text, "builtin-hard", "HardEdit suite cases: builtin-hard, or a HardEdit-format file",
        type=str),
    # diversity suite (docs/diversity.md): --seq-edits edits per set from --dataset, perplexity on --ppl-schedule
    Opt("diversity_sets", diversity_kinds, ["yesno", "choice", "few", "distinct"], "diversity suite: edit sets "
        "that differ only in target diversity (yesno, choice, few, distinct; comma-separated) or all",
        metavar="S1,S2", type=list),
    Opt("diversity_downstream", bool, False, "diversity suite: also measure downstream accuracy "
        "(--downstream-tasks, --downstream-limit) at the perplexity checkpoints", kind="flag", type=bool),
    # downstream suite
    Opt("downstream_tasks", comma_list, ["boolq", "piqa", "arc_challenge"],
        "downstream suite: lm-eval tasks from harness/downstream/tasks (comma-separated), or all", ini=True,
        metavar="T1,T2", type=list),
    Opt("downstream_limit", integer(1, allow_all=True), 20, "downstream suite: examples per task, N >= 1 or all",
        ini=True, type=int | None),
    Opt("corr_edits", integer(1), 3, "downstream suite: sequential hard edits for the perplexity-accuracy "
        "correlation", type=int),
    # localization suites: causal tracing, layer sweep, the five editing problems (docs/localization.md)
    Opt("known_facts", text, "auto", "tracing suite: known (ROME's known_1000.json in the data dir), builtin-known, "
        "or a file; auto: known with a data dir", type=str),
    Opt("trace_facts", integer(1, allow_all=True), 10, "tracing suite: known facts to trace, N >= 1 or all",
        type=int | None),
    Opt("trace_noise", number(0.0, exclusive=True), 3.0, "tracing: noise std as a multiple of the input "
        "embeddings' std (ROME: 3)", type=float),
    Opt("trace_samples", integer(1), 10, "tracing: noise draws per fact (ROME: 10)", type=int),
    Opt("trace_window", integer(1), 10, "tracing: layers restored together for mlp/attn", type=int),
    Opt("known_cases", integer(1, allow_all=True), 4, "editing-problems suite: cases of the dataset whose true "
        "answer the model knows, N >= 1 or all", type=int | None),
    Opt("sweep_layers", layer_spec, "every:6", "layer sweep: every:K, all, or a comma list of layers", type=str),
    Opt("sweep_windows", int_list, [1], "layer sweep: editing windows (1: ROME/FT-L at one layer; >1: MEMIT/FT-L "
        "over the window)", metavar="W1,W2", type=list),
    Opt("sweep_facts", integer(1, allow_all=True), 3, "layer sweep: known cases edited at every layer, N >= 1 or all",
        type=int | None),
    # sharding over machines (harness/sharding.py, harness launch, docs/cluster.md)
    Opt("shard", shard, None, "run shard I of N (1-based) of the collected tests: stable across machines, groups "
        "kept together", metavar="I/N", type=tuple | None),
    Opt("shard_durations", run_json_file, [], "balance the shards by the test durations in earlier run JSONs "
        "(repeatable); without, by count", kind="append", metavar="RUN.json", type=list),
    Opt("sweep_id", text, None, "the sweep a shard belongs to, stored in its run JSON for harness merge (default: "
        "derived from the collected tests and N)", env="HARNESS_SWEEP_ID", metavar="ID", type=str | None),
    # thresholds the suites assert (harness.thresholds.Thresholds)
    _t("collapse_ratio", "collapse_ppl_ratio", 2.0, "perplexity ratio (after / before) counted as collapse",
       number(0.0, exclusive=True)),
    _t("min_efficacy", "min_efficacy", 1.0, "minimum efficacy success of a single edit"),
    _t("max_norm_growth", "max_norm_growth", 2.0, "sequential and diversity suites: maximum ratio of the edited "
       "layers' L1 norm (sum |W|) after the stream to before", number(0.0, exclusive=True)),
    _t("min_neighborhood", "min_neighborhood", 0.5, "locality suite: minimum neighbourhood success retained"),
    _t("max_kl", "max_kl", 0.05, "locality suite: maximum mean KL(pre || post) on unrelated text, nats"),
    _t("max_top1_changed", "max_top1_changed", 0.05, "locality suite: maximum fraction of unrelated-text top-1 "
       "tokens changed"),
    _t("min_qa_locality", "min_qa_locality", 0.5, "locality suite: minimum zsRE/EasyEdit QA locality"),
    _t("min_wild_efficacy", "min_wild_efficacy", 0.0, "minimum WILD efficacy (the generated answer contains the "
       "new target) of a single edit; 0: reported, not asserted"),
    _t("min_fluency_ratio", "min_fluency_ratio", 0.0, "minimum generation fluency after / before a single edit "
       "(collapse shows as fluency falling); 0: reported, not asserted"),
    _t("max_accuracy_drop", "max_accuracy_drop", 0.1, "downstream suite: maximum accuracy drop per task"),
    _t("min_trace_drop", "min_trace_drop", 0.5, "tracing: share of P(answer) the subject noise must remove"),
    _t("min_rewrite_score", "min_rewrite_score", 0.5, "editing problems: minimum rewrite score"),
    _t("min_sweep_success", "min_sweep_success", 0.5, "layer sweep: minimum mean edit success at the best layer"),
)

_NAME = {"editor": "editors", "cases": "n_cases", "hparam": "hparams"}   # option -> Options field, where they differ


def _field(opt: Opt) -> str:
    return _NAME.get(opt.dest, opt.dest)


Options = make_dataclass(
    "Options",
    [(_field(o), o.type, field(default_factory=lambda d=o.default: copy.deepcopy(d)))
     for o in OPTIONS if o.threshold is None and o.dest not in ("no_report", "baseline")]
    + [("progress", bool, field(default=True))],
    namespace={"__doc__": "Everything a run is configured with (fields and defaults from harness.options.OPTIONS; "
                          "``progress``: show progress bars)."},
)
Options.__module__ = __name__

THRESHOLD_DEFAULTS: dict[str, float] = {o.threshold: o.default for o in OPTIONS if o.threshold}


# --- pytest glue -------------------------------------------------------------------------------------------
def _help(opt: Opt) -> str:
    where = f"; ini {opt.ini_key}" if opt.ini else ""
    where += f"; env {opt.env}" if opt.env else ""
    if opt.kind == "flag":
        return opt.help
    if opt.kind == "switch":
        return f"{opt.help} (default: {'on' if opt.default else 'off'}{where})"
    default = ",".join(map(str, opt.default)) if isinstance(opt.default, list) else opt.default
    if default is None and (opt.metavar or "").startswith("auto"):
        default = "auto"                         # auto_or(...): None means the harness chooses
    return f"{opt.help} (default: {default}{where})"


def add_options(parser: pytest.Parser) -> None:
    """``addoption`` and ``addini`` for every row of the table."""
    group = parser.getgroup("harness", "knowledge-editing benchmark")
    for opt in OPTIONS:
        if opt.kind == "flag":
            group.addoption(opt.flag, action="store_true", default=False, dest=opt.dest, help=_help(opt))
        elif opt.kind == "switch":
            group.addoption(opt.flag, action=argparse.BooleanOptionalAction, default=None, dest=opt.dest,
                            help=_help(opt))
        else:
            group.addoption(opt.flag, action="append" if opt.kind == "append" else "store", default=None,
                            dest=opt.dest, metavar=opt.metavar, help=_help(opt))
        if opt.ini:
            default = (",".join(opt.default) if isinstance(opt.default, list)
                       else str(opt.default).lower() if isinstance(opt.default, bool) else str(opt.default))
            parser.addini(opt.ini_key, opt.help, default=default)


def _raw(config: pytest.Config, opt: Opt) -> Any:
    """The option's raw value by precedence (command line, ini, environment), or None for the default."""
    value = config.getoption(opt.dest)
    if value is None and opt.ini:
        value = config.getini(opt.ini_key)
    if value is None and opt.env:
        value = os.environ.get(opt.env) or None
    return value


def _parse(opt: Opt, raw: Any, root: Path) -> Any:
    if opt.kind == "flag":
        return bool(raw)
    if raw is None:
        return copy.deepcopy(opt.default)
    if opt.kind == "append":
        return [_parse_one(opt, item, root) for item in raw]
    return _parse_one(opt, raw, root)


def _parse_one(opt: Opt, raw: str, root: Path) -> Any:
    if opt.parse is writable_dir and not Path(raw).expanduser().is_absolute():
        raw = str(root / raw)                       # a relative report dir is relative to the rootdir
    try:
        return opt.parse(raw)
    except OptionError as e:
        raise pytest.UsageError(f"{opt.flag} {raw}: {e}") from None


def value(config: pytest.Config, dest: str) -> Any:
    """One option's parsed value (command line, ini, environment, default), for plugins that need only theirs."""
    opt = next(o for o in OPTIONS if o.dest == dest)
    return _parse(opt, _raw(config, opt), Path(config.rootpath))


def read_values(config: pytest.Config) -> dict[str, Any]:
    """Every option's parsed value, keyed by ``dest``; a bad value raises ``pytest.UsageError`` (one line)."""
    root = Path(config.rootpath)
    return {opt.dest: _parse(opt, _raw(config, opt), root) for opt in OPTIONS}


def options_from(values: dict[str, Any], progress: bool = True) -> Any:
    """The :class:`Options` part of ``read_values``' result."""
    return Options(**{_field(o): values[o.dest] for o in OPTIONS
                      if o.threshold is None and o.dest not in ("no_report", "baseline")}, progress=progress)


def threshold_values(values: dict[str, Any]) -> dict[str, float]:
    """The threshold part of ``read_values``' result, keyed by Thresholds field."""
    return {o.threshold: values[o.dest] for o in OPTIONS if o.threshold}


def validate_hparams_files(items: list[tuple[str, str]]) -> dict[str, Any]:
    """Read every ``--hparams-file`` now (one warning per ignored key): a wrong editor, a missing or malformed file,
    or a file for another method is a usage error of one line. Returns editor -> what the file became."""
    from .editors import registry
    from .editors.base import HparamsError, UnknownEditorError
    from .editors.easyedit_hparams import map_easyedit_hparams

    out: dict[str, Any] = {}
    for editor, path in items:
        if editor in out:
            raise pytest.UsageError(f"--hparams-file {editor}={path}: a second file for editor {editor!r}")
        try:
            out[editor] = map_easyedit_hparams(path, registry.get(editor))
        except UnknownEditorError as e:
            raise pytest.UsageError(f"--hparams-file {editor}={path}: {e}") from None
        except HparamsError as e:
            raise pytest.UsageError(str(e)) from None
    return out


def model_depth(options: Any) -> int | None:
    """The number of layers of ``--model``, read without loading its weights: from the header of a .gguf file or of
    the embedded default's GGUF, or from the ``config.json`` of a model folder or of a hub model already in the
    Hugging Face cache (nothing is downloaded). None when it cannot be read so (a hub model not downloaded yet, a
    path that is no model): layer indices are then checked once the model is loaded."""
    from .models.loading import EMBEDDED, embedded_gguf

    name = str(options.model)
    try:
        if name in EMBEDDED or name.endswith(".gguf"):
            return gguf_block_count(embedded_gguf(name) if name in EMBEDDED else Path(name).expanduser())
        from transformers import AutoConfig
        config = AutoConfig.from_pretrained(name, local_files_only=True,
                                            trust_remote_code=bool(options.trust_remote_code))
    except Exception:  # noqa: BLE001 - not readable without a download or the weights: checked after the load
        return None
    config = getattr(config, "get_text_config", lambda: config)()
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def model_tokenizer(options: Any, cache_dir: Path) -> tuple[Any, int | None] | None:
    """The tokenizer of ``--model`` and its context window in tokens, read without loading its weights (to check
    cases against the context as they load): from a model folder, a hub model already in the Hugging Face cache, or
    the de-quantized folder of a .gguf file / the embedded default once it is built (nothing is downloaded or
    converted). None when they cannot be read so."""
    from types import SimpleNamespace

    from .models.loading import EMBEDDED, _file_digest, embedded_gguf
    from .tokens import context_length

    name = str(options.model)
    try:
        source = name
        if name in EMBEDDED or name.endswith(".gguf"):
            gguf = embedded_gguf(name) if name in EMBEDDED else Path(name).expanduser()
            source = str(Path(cache_dir) / "models" / f"{gguf.stem}-{_file_digest(gguf)}")
        from transformers import AutoConfig, AutoTokenizer
        kwargs = {"local_files_only": True, "trust_remote_code": bool(options.trust_remote_code)}
        config = AutoConfig.from_pretrained(source, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except Exception:  # noqa: BLE001 - not readable without a download or a build: checked once the model loads
        return None
    return tokenizer, context_length(SimpleNamespace(config=config))


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
                 12: "<d"}


def gguf_block_count(path: Path) -> int | None:
    """``<architecture>.block_count`` from a GGUF file's metadata, which precedes its tensors: read key by key and
    stopped as soon as the value is known (milliseconds; no tensor is read or de-quantized). None when the file is
    not GGUF (version 2 or later) or does not say."""
    import struct

    with open(path, "rb") as f:
        def read(fmt: str) -> Any:
            size = struct.calcsize(fmt)
            raw = f.read(size)
            if len(raw) < size:
                raise ValueError("truncated GGUF header")
            return struct.unpack(fmt, raw)[0]

        def string() -> str:
            return f.read(read("<Q")).decode("utf-8", "replace")

        def value(kind: int) -> Any:
            if kind in _GGUF_SCALARS:
                return read(_GGUF_SCALARS[kind])
            if kind == 8:
                return string()
            if kind == 9:                                   # an array: skipped (tokenizer vocabularies, merges)
                item, n = read("<I"), read("<Q")
                if item in _GGUF_SCALARS:
                    f.seek(n * struct.calcsize(_GGUF_SCALARS[item]), 1)
                else:
                    for _ in range(n):
                        value(item)
                return None
            raise ValueError(f"unknown GGUF value type {kind}")

        if f.read(4) != b"GGUF" or read("<I") < 2:
            return None
        read("<Q")                                          # tensor count
        arch, counts = None, {}
        for _ in range(read("<Q")):
            key = string()
            v = value(read("<I"))
            if key == "general.architecture":
                arch = v
            elif key.endswith(".block_count"):
                counts[key] = v
            if arch is not None and isinstance(counts.get(f"{arch}.block_count"), int):
                return counts[f"{arch}.block_count"]
    return None


def validate_names(options: Any) -> None:
    """Checks that need the registries: editor names, hyper-parameter overrides, downstream task names."""
    from .downstream.evaluator import UnknownTaskError, parse_tasks
    from .editors import registry
    from .editors.base import HparamsError, validate_overrides

    known = registry.names()
    for name in options.editors:
        if name not in known:
            raise pytest.UsageError(f"--editor {name}: unknown editor; available: {', '.join(known)}")
    sets_layers = any(str(h).split("=", 1)[0].strip().rsplit(".", 1)[-1] in ("layer", "layers")
                      for h in options.hparams)
    try:      # types, declared constraints, and (from the model's config, no weights) layer ranges
        validate_overrides(options.hparams, options.editors, n_layers=model_depth(options) if sets_layers else None)
    except HparamsError as e:
        raise pytest.UsageError(str(e)) from None
    try:
        options.downstream_tasks = parse_tasks(options.downstream_tasks)
    except UnknownTaskError as e:
        raise pytest.UsageError(f"--downstream-tasks: {e}") from None


def validate_corpora(options: Any) -> None:
    """``hf:`` corpora (``--stats-corpus``, ``--ppl-corpus``) must be loadable now, before the model loads: a folder
    saved with datasets, or a hub dataset that is reachable or (offline) in the datasets cache. Nothing is
    downloaded; a failure is a usage error of one line naming the fix."""
    from .data.hub import check_hf_corpus
    from .data.loaders import DataError

    for dest, data_dir_corpus in (("stats_corpus", "WikiText-2"), ("ppl_corpus", "ME-PPL")):
        spec = getattr(options, dest, None)
        if isinstance(spec, str) and spec.startswith("hf:"):
            flag = "--" + dest.replace("_", "-")
            try:
                check_hf_corpus(spec, label=f"{flag} {spec}", hint=f"--data-dir DIR for {data_dir_corpus}")
            except DataError as e:
                raise pytest.UsageError(str(e)) from None
