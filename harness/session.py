"""The state one pytest session shares across tests, with a clear owner: the loaded model, its key statistics, the
editor instances, the cases and texts, and the references measured once on the unedited model (base perplexity,
drift reference, traces, downstream base scores). State only: what a suite measures is in ``harness.protocols``,
what it asserts in ``harness.thresholds``. Created by the plugin; nothing here knows pytest."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .data import (DataError, EditCase, default_ppl_corpus, default_stats_corpus, load_cases, load_texts,
                   resolve_data_dir)
from .data.pool import default_train_pool
from .data.resolved import Resolved, cases_resolved, resolve_texts, stats_resolved
from .editors import Editor, build_editor
from .editors.common import AheadPlan
from .metrics import perplexity
from .metrics.perplexity import PerplexityResult
from .models import LoadedModel, load_model, parse_override
from .models.loading import EMBEDDED, default_cache_dir
from .options import Options
from .progress import Progress
from .run import machine_info
from .stats import TEXT_CORPUS_TOKENS, LayerStats
from .thresholds import Thresholds

__all__ = ["HarnessSession", "ModelUnavailable", "Options"]


class ModelUnavailable(RuntimeError):
    """The model could not be loaded; remembered, so that every later test gets this one line, not a new try."""


class HarnessSession:
    """Lazily loads what tests ask for, once, and keeps it for the session (restores are bit-exact, so references
    measured on the unedited model stay valid)."""

    def __init__(self, options: Options, thresholds: Thresholds | None = None, progress: Progress | None = None):
        self.options = options
        self.thresholds = thresholds or Thresholds()
        self.progress = progress or Progress(enabled=options.progress)   # long steps (load, sampling, statistics)
        self._lm: LoadedModel | None = None
        self._load_error: ModelUnavailable | None = None
        self._stats: LayerStats | None = None
        self._ppl_base: PerplexityResult | None = None
        self._ppl_texts: list[str] | None = None
        self._editors: dict[str, Editor] = {}
        self._cases: list[EditCase] | None = None
        # what the run's data resolved to, as the resolvers returned it (harness.data.resolved): "perplexity",
        # "dataset" as they load, "statistics" once the key statistics exist (``resolved``); provenance records
        # exactly these and the sequential resume key is built from the same records
        self._resolved: dict[str, Resolved] = {}
        self._diversity_sets: dict | None = None   # diversity suite: kind -> DiversitySet
        self._tokenizer_probe: tuple | None = None  # (tokenizer, context) read without the weights, () if unreadable
        self._machine: dict[str, Any] | None = None
        self._tracer = None             # localization: the CausalTracer, and traces memoised per case
        self._traces: dict[tuple[str, str], Any] = {}
        self._drift_ref = None          # locality: the unedited model's hidden states on general text
        self._downstream = None         # downstream: lm-eval wrapper holding the base-model scores
        self._wild_pre: dict[tuple[str, str], Any] = {}        # WILD: the unedited model's generations per case
        self._generation_pre: dict[tuple[str, str], Any] = {}  # fluency / consistency of the unedited model per case
        self._tfidf = None              # consistency: the TF-IDF vectorizer (CounterFact texts), fit once
        self._ppl_below: dict[int, Any] = {}   # perplexity after a layer-L edit: blocks below L, once per session
        self._ahead = AheadPlan(options.vstar_batch)   # --vstar-batch: the single edits planned, v* ahead
        self._guard_seen = 0            # editing.violations(model) when the session's model caches were last valid

    # --- the model and what is derived from it -------------------------------------------------------------
    @property
    def cache_dir(self) -> Path:
        return Path(self.options.cache_dir) if self.options.cache_dir else default_cache_dir()

    @property
    def lm(self) -> LoadedModel:
        """The loaded model. A failed load is remembered: later calls raise the same one-line error at once."""
        if self._load_error is not None:
            raise self._load_error
        if self._lm is None:
            o = self.options
            try:
                gguf = o.model in EMBEDDED or str(o.model).endswith(".gguf")
                with self.progress.step(f"loading model {o.model}",
                                        note="its GGUF is de-quantized once, then cached" if gguf else ""):
                    self._lm = load_model(o.model, device=o.device, dtype=o.dtype, device_map=o.device_map,
                                          cache_dir=self.cache_dir, trust_remote_code=o.trust_remote_code,
                                          arch_override=parse_override(o.arch_override))
                from .editing import register_source
                register_source(self._lm.model, self._pristine_source())
            except Exception as e:  # noqa: BLE001 - any failure to load is reported once, in one line
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                prefix = f"--model {o.model}: "
                self._load_error = ModelUnavailable(first if first.startswith(prefix) else prefix + first)
                raise self._load_error from e
        return self._lm

    @property
    def stats(self) -> LayerStats:
        if self._stats is None:
            name = self.options.stats_corpus
            if name == "auto":
                name = default_stats_corpus(self.options.data_dir)
            chars = 16 * (self.options.stats_tokens or TEXT_CORPUS_TOKENS)   # an hf: corpus is read only this far
            self._stats = LayerStats(self.lm, lambda: load_texts(name, data_dir=self.options.data_dir,
                                                                 max_chars=chars), name,
                                     n_tokens=self.options.stats_tokens, cache_dir=self.cache_dir,
                                     progress=self.progress)
        return self._stats

    @property
    def resolved(self) -> dict[str, Resolved]:
        """What the run's data resolved to (``harness.data.resolved.Resolved`` by name: "perplexity", "dataset",
        "statistics"), each resolved once, when the session first loaded it; absent: never loaded here."""
        held = self.__dict__.setdefault("_resolved", {})
        stats = getattr(self, "_stats", None)
        if stats is not None and "statistics" not in held:     # the corpus digest its cache is keyed by, once
            held["statistics"] = stats_resolved(stats, self.options.data_dir)
        return held

    def editor(self, name: str) -> Editor:
        """The session's instance of editor ``name`` (prepared once)."""
        if name not in self._editors:
            self._editors[name] = self.new_editor(name)
            self._editors[name].prepare(self.lm)
        return self._editors[name]

    def new_editor(self, name: str) -> Editor:
        """A fresh, unprepared instance of editor ``name`` with the run's hyper-parameters (its family file, then an
        EasyEdit ``--hparams-file``, then ``--hparam``), owned by the caller. Editors with a ``pool`` (IKE, WISE) get
        ``--train-pool`` unless ``--hparam`` names one."""
        pool = self.options.train_pool
        pool = default_train_pool(self.options.data_dir) if pool == "auto" else pool
        overrides = [f"pool={pool}", *self.options.hparams]
        mapping = self.hparams_file(name)
        if mapping is None:
            editor = build_editor(name, self.lm, overrides, stats=self.stats)
        else:
            from .editors import registry
            from .editors.base import parse_hparam_overrides
            cls = registry.get(name)
            hp = mapping.build(cls, self.lm.adapter.family, n_layers=self.lm.n_layers,
                               overrides=parse_hparam_overrides(overrides, cls))
            editor = cls(hp, stats=self.stats)
        self.ahead.configure(editor)            # Capabilities.values_ahead: the next k cases' v* together
        return editor

    def _pristine_source(self):
        """The model's pristine tensors, read from its files again when the edit guard must put back a tensor an
        editor left written (``harness.editing.register_source``); each tensor read once per session."""
        held: dict[str, Any] = {}

        def source(names):
            missing = [n for n in names if n not in held]
            if missing:
                o = self.options
                fresh = load_model(o.model, device="cpu", dtype=o.dtype, cache_dir=self.cache_dir,
                                   trust_remote_code=o.trust_remote_code,
                                   arch_override=parse_override(o.arch_override)).model
                tensors = {**dict(fresh.named_buffers()), **dict(fresh.named_parameters())}
                held.update({n: tensors[n].detach().clone() for n in missing if n in tensors})
                del fresh, tensors
            return {n: held[n] for n in names if n in held}
        return source

    # --- single edits planned ahead (``--vstar-batch``) -------------------------------------------------------
    @property
    def ahead(self) -> AheadPlan:
        """The owner of ``--vstar-batch``: the planned single edits, the v* batches and their time sharing."""
        if "_ahead" not in self.__dict__:       # a session built without __init__ (tests)
            self._ahead = AheadPlan(getattr(getattr(self, "options", None), "vstar_batch", 1) or 1)
        return self._ahead

    def plan_single_edits(self, order: list[tuple[str, EditCase]]) -> None:
        """The single edits this process will run, in order, each from the unedited model: (editor name, case) of
        the single-edit, HardEdit and locality tests after collection (the plugin's; none under xdist, where the
        order is not known). ``AheadPlan.plan``."""
        self.ahead.plan(order)

    def next_single_edits(self, editor_name: str, case: EditCase, k: int) -> list[EditCase]:
        """``AheadPlan.next``: the ``k`` single edits planned for ``editor_name`` after this one of ``case``."""
        return self.ahead.next(editor_name, case, k)

    def hparams_file(self, name: str):
        """What editor ``name``'s ``--hparams-file`` became for the loaded model (None without one). Its module
        templates must name modules of the model and agree with the run's architecture adapter."""
        path = dict(self.options.hparams_file).get(name)
        if path is None:
            return None
        from .editors import registry
        from .editors.easyedit_hparams import check_arch, map_easyedit_hparams
        mapping = map_easyedit_hparams(path, registry.get(name), n_layers=self.lm.n_layers, warn=False)
        check_arch(mapping, self.lm.model, self.lm.adapter, self.lm.n_layers)
        return mapping

    def machine(self) -> dict[str, Any]:
        """Machine facts for the run JSON, read once per session (on a GPU this runs nvidia-smi)."""
        if self._machine is None:
            self._machine = machine_info(str(self.lm.device), self.lm.identity.get("dtype"))
        return self._machine

    # --- cases and texts -------------------------------------------------------------------------------------
    def cases(self, spec: str | None = None, limit: int | None = -1) -> list[EditCase]:
        """The run's cases (``--dataset``, ``--cases``), or another set by name; ``limit`` -1: ``--cases``."""
        if spec is None and self._cases is not None and limit == -1:
            return self._cases
        cases = load_cases(spec or self.dataset_name(), data_dir=self.options.data_dir,
                           limit=self.options.n_cases if limit == -1 else limit,
                           skip_invalid=self.options.skip_invalid)
        cases = self._fit_context(cases, spec or self.dataset_name())
        if spec is None and limit == -1:
            self._cases = cases
            self.resolved["dataset"] = cases_resolved(self.dataset_name(), self.options.data_dir, cases,
                                                      requested=self.options.dataset)
        return cases

    def stream_cases(self, spec: str | None = None) -> list[EditCase]:
        """The first ``--seq-edits`` cases of ``--dataset`` (or of ``spec``) as one stream; fewer is a one-line
        error, never a shorter stream than the one asked for."""
        n = self.options.seq_edits
        cases = self.cases(spec, limit=n)
        if len(cases) < n:
            name = spec or self.dataset_name()
            raise DataError(f"--seq-edits {n}: dataset {name!r} has only {len(cases)} usable cases; ask for at most "
                            f"{len(cases)} edits, or give a larger --dataset (counterfact-easyedit has 10,000 records "
                            "in the data dir)")
        return cases

    def diversity_sets(self) -> dict:
        """The diversity suite's edit sets (``--diversity-sets``): ``--seq-edits`` edits each, built from the whole
        of ``--dataset`` (harness.data.diversity), the same subjects in every set."""
        if self._diversity_sets is None:
            from .data.diversity import load_diversity_sets
            o = self.options
            sets = load_diversity_sets(self.dataset_name(), o.seq_edits, data_dir=o.data_dir,
                                       kinds=o.diversity_sets, skip_invalid=o.skip_invalid)
            for kind, s in sets.items():       # every set shares its subjects: a case too long is not left out
                self._fit_context(s.cases, f"{self.dataset_name()} ({kind} set)", strict=True)
            self._diversity_sets = sets
        return self._diversity_sets

    def _fit_context(self, cases, name: str, strict: bool = False):
        """``cases`` checked against the model's context as they load (``harness.data.loaders.fit_context``): a case
        whose prompt is too long is a one-line error naming it, or is left out with --skip-invalid (not when
        ``strict``). Before the model is loaded its tokenizer and config are read without the weights
        (``options.model_tokenizer``); where they cannot be (first run of a hub id or of a .gguf), ``strict`` loads
        the model, else the check waits for a load with the model there (the sequential suite loads its stream in
        the test; single edits refuse a too-long prompt when scoring before the edit)."""
        from .data.loaders import fit_context
        from .options import model_tokenizer
        from .tokens import context_length
        if self._lm is None and self._tokenizer_probe is None:
            self._tokenizer_probe = model_tokenizer(self.options, self.cache_dir) or ()
        if self._lm is None and not self._tokenizer_probe and not strict:
            return cases
        lm = self._lm if self._lm is not None or self._tokenizer_probe else self.lm
        tokenizer, limit = (lm.tokenizer, context_length(lm.model)) if lm is not None else self._tokenizer_probe
        return fit_context(cases, tokenizer, limit, name=name, skip_invalid=self.options.skip_invalid and not strict)

    def dataset_name(self) -> str:
        if self.options.dataset != "auto":
            return self.options.dataset
        root = resolve_data_dir(self.options.data_dir)
        has_cf = root is not None and (root / "counterfact" / "counterfact_rome_sample500.json").is_file()
        return "counterfact" if has_cf else "builtin"

    def wild_dataset_name(self) -> str:
        """The WILD suite's cases: ``--wild-dataset``, or with ``auto`` QAEdit when the data dir has it (the set
        WILD was proposed with), else the run's dataset."""
        if self.options.wild_dataset != "auto":
            return self.options.wild_dataset
        root = resolve_data_dir(self.options.data_dir)
        has_qa = root is not None and (root / "collapse" / "QAEdit_inter_1k.json").is_file()
        return "qaedit" if has_qa else self.dataset_name()

    def ppl_corpus_name(self) -> str:
        name = self.options.ppl_corpus
        return default_ppl_corpus(self.options.data_dir) if name == "auto" else name

    def ppl_texts(self) -> list[str]:
        if self._ppl_texts is None:
            self._ppl_texts, self.resolved["perplexity"] = resolve_texts(
                self.ppl_corpus_name(), data_dir=self.options.data_dir, limit=self.options.ppl_texts,
                texts_requested=self.options.ppl_texts)
        return self._ppl_texts

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

    def sweep_layers(self) -> list[int]:
        """``--sweep-layers`` resolved against the model: every:K (0, K, 2K, ...), all, or a comma list."""
        from .tracing import parse_layers
        try:
            return parse_layers(self.options.sweep_layers, self.lm.n_layers)
        except ValueError as e:          # the syntax was checked at start-up; this is a layer the model lacks
            raise ValueError(f"--sweep-layers: {e}") from None

    # --- references measured once on the unedited model -----------------------------------------------------
    def perplexity(self, prefix: str = "", edit=None) -> PerplexityResult:
        """Perplexity of the model as it is now on the session's perplexity texts (each after ``prefix``: an
        in-context editor's prompt prefix). ``edit``: the one edit the unedited model now carries; when it wrote
        parameters of blocks L and above only, the blocks below L are run once per session and reused
        (``harness.models.partial.BelowLayer``; the same numbers)."""
        return perplexity(self.lm.model, self.lm.tokenizer, self.ppl_texts(), prefix=prefix,
                          below=self._below_edit(edit))

    def _below_edit(self, edit):
        """The session's ``BelowLayer`` for ``edit``'s lowest written block, or None (no edit, hooks, a prompt
        prefix, or a written parameter outside the blocks)."""
        from .editing import violations
        if violations(self.lm.model) != getattr(self, "_guard_seen", 0):   # an editor left the model written:
            self._ppl_below.clear()                                     # captured blocks may hold its trace
            self._guard_seen = violations(self.lm.model)
        if edit is None or edit.undo is not None or edit.prompt_prefix or not edit.changed_parameters:
            return None
        layers = [self.lm.adapter.layer_of(n) for n in edit.changed_parameters]
        if any(layer is None for layer in layers) or min(layers) == 0:
            return None
        from .models.partial import BelowLayer
        layer = min(layers)
        if layer not in self._ppl_below:
            self._ppl_below[layer] = BelowLayer(self.lm.model, self.lm.adapter, layer)
        return self._ppl_below[layer]

    def base_perplexity(self) -> PerplexityResult:
        """Perplexity of the unedited model, computed once per session."""
        if self._ppl_base is None:
            with self.progress.step(f"perplexity of the unedited model ({self.ppl_corpus_name()}, "
                                    f"{len(self.ppl_texts())} texts)", note="once per session"):
                self._ppl_base = self.perplexity()
        return self._ppl_base

    def drift_reference(self):
        """The unedited model's next-token distributions on the perplexity texts (as final hidden states), built
        once per session; the locality suite's KL / top-1 reference."""
        if self._drift_ref is None:
            from .locality import DriftReference
            self._drift_ref = DriftReference.build(self.lm.model, self.lm.tokenizer, self.ppl_texts())
        return self._drift_ref

    def wild_reference(self, case: EditCase) -> dict[str, list]:
        """The unedited model's greedy generations for a case's WILD prompts (locality compares with them),
        generated once per case and session."""
        key = (case.case_id, case.rewrite_prompt)
        if key not in self._wild_pre:
            from .metrics.wild import case_generations
            self._wild_pre[key] = case_generations(self.lm.model, self.lm.tokenizer, case)
        return self._wild_pre[key]

    def tfidf(self):
        """The TF-IDF vectorizer of generation consistency: fit once on the data dir's CounterFact texts, or on
        the built-in edits and passages without a data dir."""
        if self._tfidf is None:
            from .metrics.generation import counterfact_documents, fit_tfidf
            root = resolve_data_dir(self.options.data_dir)
            builtin = [" ".join((c.rewrite_prompt, c.target_new, *c.paraphrase_prompts, *c.attribute_prompts))
                       for c in load_cases("builtin")] + load_texts("builtin")
            has_cf = root is not None and (root / "counterfact").is_dir()
            self._tfidf = fit_tfidf(counterfact_documents(root if has_cf else None, builtin))
        return self._tfidf

    def generation_reference(self, case: EditCase) -> tuple[dict[str, Any], list[str]]:
        """Fluency and consistency of the unedited model on a case's generation prompts, once per case."""
        key = (case.case_id, case.rewrite_prompt)
        if key not in self._generation_pre:
            from .metrics.generation import generation_metrics
            self._generation_pre[key] = generation_metrics(self.lm.model, self.lm.tokenizer, case,
                                                           vectorizer=self.tfidf())
        return self._generation_pre[key]

    @property
    def tracer(self):
        """The session's CausalTracer (``--trace-noise``, ``--trace-samples``, ``--trace-window``)."""
        if self._tracer is None:
            from .tracing import CausalTracer
            o = self.options
            self._tracer = CausalTracer(self.lm, noise=o.trace_noise, samples=o.trace_samples, window=o.trace_window)
        return self._tracer

    def trace_case(self, case: EditCase):
        """Causal tracing of a case's true answer on its rewrite prompt, memoised for the session."""
        key = (case.case_id, case.rewrite_prompt)
        if key not in self._traces:
            self._traces[key] = self.tracer.trace(case.rewrite_prompt, case.subject, case.target_true)
        return self._traces[key]

    @property
    def downstream(self):
        """The downstream evaluator (lm-eval on the in-memory model); it caches the base-model scores per task and
        example limit. Raises ``DownstreamUnavailable`` when lm-eval is not installed."""
        if self._downstream is None:
            from .downstream import DownstreamEvaluator
            self._downstream = DownstreamEvaluator(self.lm, data_dir=self.options.data_dir)
        return self._downstream
