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

    # --- measurements ----------------------------------------------------------------------------------
    def perplexity(self) -> PerplexityResult:
        lm = self.lm
        return perplexity(lm.model, lm.tokenizer, self.ppl_texts())

    def base_perplexity(self) -> PerplexityResult:
        """Perplexity of the unedited model, computed once per session (restores are bit-exact)."""
        if self._ppl_base is None:
            self._ppl_base = self.perplexity()
        return self._ppl_base

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
