"""The state one pytest session shares across tests, with a clear owner: the loaded model, its key statistics, the
base-model perplexity, the editor instances and the cases. Created by the plugin; nothing here knows pytest."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from .data import (EditCase, default_ppl_corpus, default_stats_corpus, load_cases, load_texts,
                   resolve_data_dir)
from .editors import Edit, Editor, build_editor
from .metrics import counterfact_metrics, perplexity
from .metrics.perplexity import PerplexityResult
from .models import DEFAULT_MODEL, LoadedModel, load_model, param_digest, parse_override
from .models.loading import default_cache_dir
from .run import Thresholds, machine_info
from .stats import LayerStats
from .timing import PhaseTimer


@dataclass
class Options:
    """Everything a run can be configured with (the plugin fills it from the command line and ini)."""

    editors: list[str] = field(default_factory=lambda: ["rome", "memit", "ft"])
    model: str = DEFAULT_MODEL
    device: str = "auto"
    dtype: str = "float32"
    device_map: str | None = None
    arch_override: str | None = None
    trust_remote_code: bool = False
    data_dir: str | None = None
    dataset: str = "auto"          # CounterFact when the data dir has it, else the built-in set
    n_cases: int | None = 10
    skip_invalid: bool = False
    ppl_corpus: str = "auto"
    ppl_texts: int | None = 50
    stats_corpus: str = "auto"
    stats_tokens: int = 100_000
    cache_dir: str | None = None
    hparams: list[str] = field(default_factory=list)
    progress: bool = True
    report_dir: str = "reports"
    seq_edits: int = 10             # sequential suite: number of edits
    batch_size: int = 1             # sequential suite: edits per editor call (MEMIT and successors)
    ppl_schedule: str = "every"     # sequential suite: every, every:K, geometric
    resume: bool = False            # sequential suite: continue from the journal of an interrupted run
    hard_dataset: str = "builtin-hard"
    # localization suites (causal tracing, layer sweep, editing problems)
    known_facts: str = "auto"       # tracing: "known" (ROME's known_1000.json), "builtin-known" or a file
    trace_facts: int | None = 10    # tracing: facts the model knows, traced one test each
    trace_noise: float = 3.0        # noise std as a multiple of the input embeddings' std (ROME: 3)
    trace_samples: int = 10         # noise draws per fact (ROME: 10)
    trace_window: int = 10          # layers restored together for mlp / attn tracing (ROME: 10)
    known_cases: int | None = 4     # editing problems: cases whose true answer the model knows
    sweep_layers: str = "every:6"   # layer sweep: every:K, all, or a comma list of layers
    sweep_windows: list[int] = field(default_factory=lambda: [1])
    sweep_facts: int | None = 3     # layer sweep: known cases edited at every swept layer
    downstream_tasks: list[str] = field(default_factory=lambda: ["boolq", "piqa", "arc_challenge"])
    downstream_limit: int | None = 20   # examples per downstream task (None: all)
    corr_edits: int = 3                 # downstream suite: sequential edits for the ppl-accuracy correlation


class HarnessSession:
    """Lazily loads what tests ask for, once; restores and checks the model after every edit."""

    def __init__(self, options: Options, thresholds: Thresholds | None = None):
        self.options = options
        self.thresholds = thresholds or Thresholds()
        self._lm: LoadedModel | None = None
        self._stats: LayerStats | None = None
        self._ppl_base: PerplexityResult | None = None
        self._ppl_texts: list[str] | None = None
        self._editors: dict[str, Editor] = {}
        self._cases: list[EditCase] | None = None
        self._machine: dict[str, Any] | None = None
        self._tracer = None             # localization: the CausalTracer, and traces memoised per case
        self._traces: dict[tuple[str, str], Any] = {}
        self._drift_ref = None          # locality: the unedited model's hidden states on general text
        self._downstream = None         # downstream: lm-eval wrapper holding the base-model scores

    # --- resources --------------------------------------------------------------------------------------
    @property
    def cache_dir(self) -> Path:
        return Path(self.options.cache_dir) if self.options.cache_dir else default_cache_dir()

    @property
    def lm(self) -> LoadedModel:
        if self._lm is None:
            o = self.options
            self._lm = load_model(o.model, device=o.device, dtype=o.dtype, device_map=o.device_map,
                                  cache_dir=self.cache_dir, trust_remote_code=o.trust_remote_code,
                                  arch_override=parse_override(o.arch_override))
        return self._lm

    @property
    def stats(self) -> LayerStats:
        if self._stats is None:
            name = self.options.stats_corpus
            if name == "auto":
                name = default_stats_corpus(self.options.data_dir)
            self._stats = LayerStats(self.lm, lambda: load_texts(name, data_dir=self.options.data_dir), name,
                                     n_tokens=self.options.stats_tokens, cache_dir=self.cache_dir,
                                     progress=self.options.progress)
        return self._stats

    def cases(self, spec: str | None = None, limit: int | None = -1) -> list[EditCase]:
        """The run's cases (``--dataset``, ``--cases``), or another set by name."""
        if spec is None and self._cases is not None and limit == -1:
            return self._cases
        cases = load_cases(spec or self.dataset_name(), data_dir=self.options.data_dir,
                           limit=self.options.n_cases if limit == -1 else limit,
                           skip_invalid=self.options.skip_invalid)
        if spec is None and limit == -1:
            self._cases = cases
        return cases

    def dataset_name(self) -> str:
        if self.options.dataset != "auto":
            return self.options.dataset
        root = resolve_data_dir(self.options.data_dir)
        has_cf = root is not None and (root / "counterfact" / "counterfact_rome_sample500.json").is_file()
        return "counterfact" if has_cf else "builtin"

    def ppl_corpus_name(self) -> str:
        name = self.options.ppl_corpus
        return default_ppl_corpus(self.options.data_dir) if name == "auto" else name

    def ppl_texts(self) -> list[str]:
        if self._ppl_texts is None:
            self._ppl_texts = load_texts(self.ppl_corpus_name(), data_dir=self.options.data_dir,
                                         limit=self.options.ppl_texts)
        return self._ppl_texts

    def editor(self, name: str) -> Editor:
        if name not in self._editors:
            self._editors[name] = build_editor(name, self.lm, self.options.hparams, stats=self.stats)
            self._editors[name].prepare(self.lm)
        return self._editors[name]

    def machine(self) -> dict[str, Any]:
        """Machine facts for the run JSON, read once per session (on a GPU this runs nvidia-smi)."""
        if self._machine is None:
            self._machine = machine_info(str(self.lm.device), self.lm.identity.get("dtype"))
        return self._machine

    # --- localization: causal tracing, layer sweep, editing problems (harness/tracing.py, problems.py) ------
    @property
    def tracer(self):
        if self._tracer is None:
            from .tracing import CausalTracer
            o = self.options
            self._tracer = CausalTracer(self.lm, noise=o.trace_noise, samples=o.trace_samples, window=o.trace_window)
        return self._tracer

    def known_facts(self) -> list:
        """The first ``trace_facts`` facts of ``--known-facts`` whose answer the model predicts (top-1)."""
        from .data.known_facts import load_known_facts
        from .problems import first_known
        facts = load_known_facts(self.options.known_facts, data_dir=self.options.data_dir)
        return first_known(self.lm, facts, lambda f: f.prompt, lambda f: f.attribute, self.options.trace_facts)

    def known_cases(self, limit: int | None) -> list[EditCase]:
        """The run's dataset (all of it) filtered to cases whose true answer the model predicts; the first ``limit``."""
        from .problems import known_cases
        return known_cases(self.lm, self.cases(limit=None), limit)

    def trace_case(self, case):
        """Causal tracing of a case's true answer on its rewrite prompt, memoised for the session."""
        key = (case.case_id, case.rewrite_prompt)
        if key not in self._traces:
            self._traces[key] = self.tracer.trace(case.rewrite_prompt, case.subject, case.target_true)
        return self._traces[key]

    def sweep_layers(self) -> list[int]:
        """``--sweep-layers``: every:K (0, K, 2K, ...), all, or a comma list (negative counts from the end)."""
        from .tracing import parse_layers
        return parse_layers(self.options.sweep_layers, self.lm.n_layers)

    def layer_sweep(self, editor_name: str, window: int):
        """Edit each known case at each swept layer with a fresh ``editor_name`` instance (owned by the sweep)."""
        from .problems import LayerSweep
        editor = build_editor(editor_name, self.lm, self.options.hparams, stats=self.stats)
        sweep = LayerSweep(self.lm, editor, lambda ed, case: self.edited(ed, [case]), self.trace_case, window=window,
                           progress=print if self.options.progress else None)
        return sweep.run(self.known_cases(self.options.sweep_facts), self.sweep_layers())

    def editing_problem(self, editor: Editor, case: EditCase, problem: str, timer: PhaseTimer):
        """One of Hase et al.'s five editing problems for ``case``: (metrics, info); the model is restored after."""
        from .problems import run_problem
        return run_problem(self.lm, case, problem, self.tracer, lambda request: self.edited(editor, [request], timer))

    # --- measurements ----------------------------------------------------------------------------------
    def perplexity(self) -> PerplexityResult:
        lm = self.lm
        return perplexity(lm.model, lm.tokenizer, self.ppl_texts())

    def base_perplexity(self) -> PerplexityResult:
        """Perplexity of the unedited model, computed once per session (restores are bit-exact)."""
        if self._ppl_base is None:
            self._ppl_base = self.perplexity()
        return self._ppl_base

    def drift_reference(self):
        """The unedited model's next-token distributions on the perplexity texts (as final hidden states), built
        once per session (restores are bit-exact); the locality suite's KL / top-1 reference."""
        if self._drift_ref is None:
            from .locality import DriftReference
            self._drift_ref = DriftReference.build(self.lm.model, self.lm.tokenizer, self.ppl_texts())
        return self._drift_ref

    @property
    def downstream(self):
        """The downstream evaluator (lm-eval on the in-memory model); it caches the base-model scores per task and
        example limit for the session. Raises ``DownstreamUnavailable`` when lm-eval is not installed."""
        if self._downstream is None:
            from .downstream import DownstreamEvaluator
            self._downstream = DownstreamEvaluator(self.lm, data_dir=self.options.data_dir)
        return self._downstream

    def counterfact(self, case: EditCase, edit: Edit | None = None) -> dict[str, Any]:
        return counterfact_metrics(self.lm.model, self.lm.tokenizer, case,
                                   prefix=edit.prompt_prefix if edit else "")

    def single_edit(self, editor: Editor, case: EditCase, timer: PhaseTimer) -> tuple[dict, dict, dict]:
        """Edit, score, perplexity after, restore. Returns (metrics, protocols, edit info); the thresholds'
        verdicts are ``self.problems(metrics)``."""
        from .metrics.counterfact import PROTOCOLS as CF
        from .metrics.perplexity import PROTOCOLS as PPL

        base = self.base_perplexity()
        with timer.phase("evaluate"):
            pre = self.counterfact(case)
        with self.edited(editor, [case], timer) as edit:
            with timer.phase("evaluate"):
                post = self.counterfact(case, edit)
            with timer.phase("perplexity"):
                ppl = self.perplexity()
        metrics = {**{f"{k}_pre": v for k, v in pre.items()}, **post,
                   "ppl_before": base.mean_ppl, "ppl_after": ppl.mean_ppl, "ppl_ratio": ppl.mean_ppl / base.mean_ppl,
                   "ppl_token_before": base.token_ppl, "ppl_token_after": ppl.token_ppl}
        ppl_protocol = f"{PPL['ppl']} on {self.ppl_corpus_name()}"
        protocols = {**{f"{k}_pre": v for k, v in CF.items()}, **CF,
                     **{k: ppl_protocol for k in ("ppl_before", "ppl_after", "ppl_ratio")},
                     "ppl_token_before": PPL["ppl_token"], "ppl_token_after": PPL["ppl_token"]}
        return metrics, protocols, edit.info

    def problems(self, metrics: dict) -> list[str]:
        """Threshold violations of a single edit, each naming the metric, its value and the threshold."""
        return [p for p in (self.thresholds.check_collapse(metrics["ppl_ratio"]),
                            self.thresholds.check_efficacy(metrics["efficacy_success"])) if p]

    def sequential(self, editor: Editor, cases: Sequence[EditCase], timer: PhaseTimer):
        """Run ``cases`` as one sequential edit stream (journaled, resumable); the model is restored after."""
        from .sequential import SequentialRun
        run = SequentialRun(self.lm, editor, cases, perplexity=lambda: self.perplexity().mean_ppl,
                            ppl_base=self.base_perplexity().mean_ppl,
                            journal_dir=Path(self.options.report_dir) / "sequential",
                            batch_size=self.options.batch_size, ppl_schedule=self.options.ppl_schedule,
                            resume=self.options.resume, progress=self.options.progress)
        return run.run(timer)

    # --- editing with guaranteed restore --------------------------------------------------------------
    @contextlib.contextmanager
    def edited(self, editor: Editor, cases: Sequence[EditCase], timer: PhaseTimer | None = None
               ) -> Iterator[Edit]:
        """Apply ``editor`` to ``cases``; on exit restore the model bit-exactly (checked by digest) and reset
        the editor's accumulated state."""
        timer = timer or PhaseTimer(self.lm.device)
        names = editor.edited_parameters(self.lm) if type(editor).apply is Editor.apply else None
        before = param_digest(self.lm.model, names) if names else None
        edit = None
        try:
            with timer.phase("edit"):
                edit = editor.apply(self.lm, cases)
            yield edit
        finally:
            with timer.phase("restore"):
                if edit is not None:
                    edit.restore()
                editor.reset()
            if before is not None and param_digest(self.lm.model, names) != before:
                raise RuntimeError(f"restore after {editor.name} was not bit-exact for {names}")
