"""The metric registry: what every metric the harness records means, which way is better and how it aggregates.

In the spirit of lm-eval's ``register_metric``: a :class:`MetricSpec` per exact name (``ppl_ratio``) or per family
pattern (``downstream_{task}_after``, ``{base}_pre``). The terminal summary, the run JSON's summary, the HTML report,
the leaderboard, ``harness compare`` and ``harness export`` all read it; none of them guesses from a name.

Aggregation is one function, :func:`aggregate`: the mean (or median, or minimum) over cases with a 95% percentile
bootstrap confidence interval, seeded (:data:`BOOTSTRAP_SEED`) so that a rerun prints the same numbers.
:func:`paired_bootstrap` is its paired form for comparing two runs case by case. A metric that is not registered is
still shown (mean and interval) but has no direction, so nothing ranks or gates on it.
"""
from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

AGGREGATIONS = ("mean", "median", "min", "none")
BOOTSTRAP_SEED = 20240601        # the bootstrap's generator seed: the same inputs give the same intervals
BOOTSTRAP_RESAMPLES = 2000
CONFIDENCE = 0.95


@dataclass(frozen=True)
class MetricSpec:
    """One metric (or a family of metrics, when ``name`` holds ``{placeholders}``).

    higher_is_better: True / False, or None for a metric with no direction for an editor (a property of the
    unedited model, a diagnostic, a correlation): shown, never ranked or gated on. A metric without a direction
    says why in ``why_no_direction`` (the registry refuses one that does not).
    aggregation: "mean" | "median" | "min" (e.g. edits_to_collapse: the first collapse over runs; a missing value
    means never, i.e. +inf) | "none" (series and tables: per record only).
    relative: compare changes as current / baseline - 1 (ratios, perplexities, counts, seconds) rather than as
    current - baseline (probabilities, fractions, scores).
    headline: a column of the summary tables (terminal, HTML, leaderboard) when the metric is present.
    """

    name: str
    protocol: str
    higher_is_better: bool | None
    aggregation: str = "mean"
    unit: str = ""
    label: str = ""
    description: str = ""
    relative: bool = False
    headline: bool = False
    registered: bool = True
    why_no_direction: str = ""

    def __post_init__(self) -> None:
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"metric {self.name!r}: aggregation {self.aggregation!r} is not one of {AGGREGATIONS}")

    @property
    def display(self) -> str:
        return self.label or self.name

    @property
    def tooltip(self) -> str:
        """One line for a column header: description, unit, direction, protocol."""
        direction = {True: "higher is better", False: "lower is better",
                     None: f"no direction ({self.why_no_direction})" if self.why_no_direction else "no direction"
                     }[self.higher_is_better]
        parts = [self.description or self.name, f"unit: {self.unit}" if self.unit else "", direction,
                 f"protocol: {self.protocol}" if self.protocol else ""]
        return "; ".join(p for p in parts if p)


_PLACEHOLDER = re.compile(r"\{(\w+)\}")


@functools.lru_cache(maxsize=None)
def _pattern(name: str) -> re.Pattern[str]:
    """``downstream_{task}_after`` -> ``^downstream_(?P<task>.+?)_after$``."""
    out, pos = [], 0
    for m in _PLACEHOLDER.finditer(name):
        out.append(re.escape(name[pos:m.start()]))
        out.append(f"(?P<{m.group(1)}>.+?)")
        pos = m.end()
    out.append(re.escape(name[pos:]))
    return re.compile("^" + "".join(out) + "$")


class MetricRegistry:
    """Exact names first, then family patterns in registration order (register the specific ones first).

    ``builtins``: the registry loads the protocol-owned built-in specs on its first lookup, so a library caller
    (``harness.report.compare``) gets the same directions as the CLI and the plugin without calling
    ``register_builtin_specs()`` first. They are named, not imported (``BUILTIN_LOADER``, like an entry point):
    metrics sit below the protocols that own those specs, and imports point down only."""

    BUILTIN_LOADER = "harness.specs:register_builtin_specs"

    def __init__(self, builtins: bool = False) -> None:
        self._exact: dict[str, MetricSpec] = {}
        self._families: list[tuple[re.Pattern[str], Callable[[str, dict[str, str]], MetricSpec | None]]] = []
        self._order: list[str] = []
        self._builtins_pending = builtins

    def _load_builtins(self) -> None:
        if self._builtins_pending:
            self._builtins_pending = False            # first: register_builtin_specs looks names up itself
            import importlib
            module, _, function = self.BUILTIN_LOADER.partition(":")
            getattr(importlib.import_module(module), function)(self)

    def register(self, spec: MetricSpec) -> MetricSpec:
        """Register an exact name, or a family when ``spec.name`` has ``{placeholders}`` (formatted into the
        label and description of each member). A spec without a direction must say why (``why_no_direction``)."""
        if spec.higher_is_better is None and not spec.why_no_direction:
            raise ValueError(f"metric {spec.name!r} has no direction: give higher_is_better (True/False) or say in "
                             "why_no_direction why it has none")
        if _PLACEHOLDER.search(spec.name):
            def member(name: str, groups: dict[str, str], spec: MetricSpec = spec) -> MetricSpec:
                return replace(spec, name=name, label=spec.label.format(**groups),
                               description=spec.description.format(**groups), protocol=spec.protocol.format(**groups))
            self.register_family(spec.name, member)
        else:
            if spec.name in self._exact:
                raise ValueError(f"metric {spec.name!r} is already registered")
            self._exact[spec.name] = spec
        self._order.append(spec.name)
        return spec

    def register_family(self, pattern: str, make: Callable[[str, dict[str, str]], MetricSpec | None]) -> None:
        """A family whose member specs are built by ``make(name, groups)`` (None: not a member after all)."""
        self._families.append((_pattern(pattern), make))

    def get(self, name: str) -> MetricSpec | None:
        """The spec of ``name``, or None when it is not registered."""
        self._load_builtins()
        if name in self._exact:
            return self._exact[name]
        for pattern, make in self._families:
            m = pattern.match(name)
            if m and (spec := make(name, m.groupdict())) is not None:
                return spec
        return None

    def spec(self, name: str) -> MetricSpec:
        """The spec of ``name``; an unregistered name gets a direction-less mean (shown, never compared)."""
        return self.get(name) or MetricSpec(name, "", None, "mean", label=name, registered=False,
                                            description="not in the metric registry (shown, never compared)",
                                            why_no_direction="not in the metric registry")

    def order(self, name: str) -> tuple[int, str]:
        """Sort key: registration order of the exact name or family, unregistered names last."""
        self._load_builtins()
        if name in self._exact:
            return (self._order.index(name), name)
        for i, registered in enumerate(self._order):
            if _PLACEHOLDER.search(registered) and _pattern(registered).match(name):
                return (i, name)
        return (len(self._order), name)

    def names(self) -> list[str]:
        self._load_builtins()
        return list(self._order)

    def specs(self) -> list[MetricSpec]:
        """Every registered spec: the exact names, and one representative member per family (placeholders filled
        with their own names, e.g. ``downstream_task_after``)."""
        self._load_builtins()
        out = []
        for name in self._order:
            if name in self._exact:
                out.append(self._exact[name])
            elif (spec := self.get(_PLACEHOLDER.sub(lambda m: m.group(1), name))) is not None:
                out.append(spec)
        return out


REGISTRY = MetricRegistry(builtins=True)
register_metric = REGISTRY.register
get_metric = REGISTRY.get
metric_spec = REGISTRY.spec

# --------------------------------------------------------------------------- the metrics the harness records
CF = "rome-counterfact (per-token-averaged probability comparison)"
TF = "easyedit-teacher-forced (token argmax accuracy)"
PPL = "me-ppl (mean of per-sentence perplexity)"
TRACE = "causal tracing (ROME): P(answer | noised subject, clean state restored) - P(answer | noised subject)"
SWEEP = "layer sweep (Hase et al. 2023)"
PROBLEM = "editing problems (Hase et al. 2023): share of the possible change in P(target) achieved"


# why a metric has no direction (MetricSpec.why_no_direction): what kind of number it is
MODEL_PROPERTY = "a property of the unedited model, the same for every editor"
RUN_SETTING = "a count or setting of the run, not a result"
SERIES = "a series or table, read per record; its scalar summaries carry the direction"
CASE_SET = "a property of the case set, chosen by the suite, not a result of the editor"
CORRELATION = "a correlation: its sign and size are the finding, neither is better"
DIAGNOSTIC = "a diagnostic of where the model stores a fact, not a score of the editor"
LAYER = "a layer index: where, not how well"
FIT = "an explanatory fit (R^2) of edit success, a finding about the model, not a score of the editor"
ABSOLUTE_NORM = "an absolute norm that depends on the model; its growth (norm_growth) is directed"
OBJECTIVE = ("P(target) after the edit: higher for rewrite/amplify/force, lower for erase; the problem scores are "
             "directed")


def _m(name: str, protocol: str, higher: bool | None, label: str, description: str, unit: str = "fraction",
       aggregation: str = "mean", relative: bool = False, headline: bool = False, why: str = "") -> None:
    register_metric(MetricSpec(name, protocol, higher, aggregation, unit, label, description, relative, headline,
                               why_no_direction=why))


# single edits: CounterFact (ROME) and EasyEdit token accuracy
_m("efficacy_success", CF, True, "ES", "P(new) > P(true) on the rewrite prompt", headline=True)
_m("paraphrase_success", CF, True, "PS", "P(new) > P(true), mean over paraphrase prompts", headline=True)
_m("neighborhood_success", CF, True, "NS", "P(true) > P(new), mean over neighbourhood prompts", headline=True)
_m("efficacy_magnitude", CF, True, "EM", "P(new) - P(true) on the rewrite prompt", "probability")
_m("paraphrase_magnitude", CF, True, "PM", "P(new) - P(true), mean over paraphrase prompts", "probability")
_m("neighborhood_magnitude", CF, True, "NM", "P(true) - P(new), mean over neighbourhood prompts", "probability")
_m("rome_score", CF, True, "ROME score", "harmonic mean of ES, PS and NS (0 if any is 0)")
_m("rewrite_acc", TF, True, "rewrite acc", "share of target_new tokens that are the argmax on the rewrite prompt")
_m("rephrase_acc", TF, True, "rephrase acc", "same on the paraphrase prompts")
_m("locality_acc", TF, True, "locality acc", "share of target_true tokens that are the argmax on neighbourhood prompts")
# perplexity (the collapse surrogate)
_m("ppl_ratio", PPL, False, "ppl x", "perplexity after the edit(s) / before, on general text", "ratio",
   relative=True, headline=True)
_m("ppl_after", PPL, False, "ppl after", "perplexity of the edited model on general text", "perplexity",
   relative=True)
_m("ppl_before", PPL, None, "ppl before", "perplexity of the unedited model (a property of the model)", "perplexity",
   why=MODEL_PROPERTY)
_m("ppl_token_after", "token-weighted perplexity", False, "token ppl after", "exp(total NLL / tokens), edited",
   "perplexity", relative=True)
_m("ppl_token_before", "token-weighted perplexity", None, "token ppl before", "exp(total NLL / tokens), unedited",
   "perplexity", why=MODEL_PROPERTY)
# locality
_m("neighborhood_retained", CF, True, "NS retained", "neighbourhood prompts the unedited model got right that "
   "stay right after the edit", headline=True)
_m("kl_unrelated", "KL(P_pre || P_post) of next-token distributions on general text", False, "KL",
   "mean KL divergence of next-token distributions on unrelated text", "nats", relative=True, headline=True)
_m("top1_changed", "top-1 next token on general text", False, "top-1 changed",
   "share of unrelated-text positions whose top-1 next token changed", relative=True, headline=True)
_m("qa_locality", "easyedit locality (teacher-forced argmax unchanged)", True, "QA locality",
   "share of zsRE/KnowEdit locality answer tokens whose argmax is unchanged by the edit", headline=True)
_m("qa_locality_acc", "teacher-forced argmax accuracy of loc_ans after loc", True, "QA acc",
   "accuracy on the locality questions after the edit")
_m("qa_locality_acc_pre", "teacher-forced argmax accuracy of loc_ans after loc", None, "QA acc before",
   "accuracy on the locality questions before the edit (a property of the model)", why=MODEL_PROPERTY)
_m("drift_positions", "predicted positions of the general texts", None, "drift positions",
   "positions the KL and top-1 drift are averaged over", "positions", why=RUN_SETTING)
# sequential editing
_m("edits_to_collapse", "perplexity ratio reaching the collapse threshold", True, "edits to collapse",
   "fewest edits after which the perplexity ratio reached the collapse threshold (never: the stream survived)",
   "edits", aggregation="min", relative=True, headline=True)
_m("efficacy_immediate", CF, True, "ES immediate", "efficacy success right after each edit, mean over the stream",
   headline=True)
_m("efficacy_final", CF, True, "ES final", "every edit re-scored after the last one", headline=True)
_m("paraphrase_final", CF, True, "PS final", "paraphrase success of every edit after the last one")
_m("neighborhood_final", CF, True, "NS final", "neighbourhood success of every edit after the last one")
_m("n_edits", "sequential stream", None, "edits", "edits made in the stream", "edits", why=RUN_SETTING)
for _series, _text in (("ppl_curve", "[n_edits, perplexity] after each scheduled edit count"),
                       ("norm_l1", "[n_edits, mean |W|] of the (first) edited weight after each edit"),
                       ("norm_l1_by_param", "per edited weight: [n_edits, mean |W|]"),
                       ("delta_fro", "[n_edits, ||W - W0||_F summed over edited weights]"),
                       ("probe_tf_efficacy", "[n_edits, teacher-forced efficacy of sampled past edits] (Mirage)"),
                       ("probe_tf_acc", "[n_edits, teacher-forced token accuracy of sampled past edits] (Mirage)"),
                       ("probe_wild_efficacy", "[n_edits, WILD containment of sampled past edits] (Mirage)"),
                       ("probe_wild_em", "[n_edits, WILD exact match of sampled past edits] (Mirage)"),
                       ("final_ci", "per final score of a stream (efficacy, paraphrase, neighborhood): [low, "
                                    "high], the 95% bootstrap interval over the stream's edits"),
                       ("downstream_series", "per state of a sequential run: n_edits, perplexity, accuracy per task")):
    _m(_series, "sequential stream", None, _series, _text, "series", aggregation="none", why=SERIES)
# edited-layer norms (the D4S paper's L1 norm: sum |W| over the edited weights), sequential and diversity suites
NORM = "sum |W| over the edited weights (D4S's L1 norm)"
_m("norm_growth", NORM, False, "norm x", "L1 norm of the edited layers after the stream / before", "ratio",
   relative=True, headline=True)
_m("l1_before", NORM, None, "L1 before", "L1 norm of the edited layers, unedited model", "sum |W|", why=ABSOLUTE_NORM)
_m("l1_after", NORM, None, "L1 after", "L1 norm of the edited layers after the stream", "sum |W|", why=ABSOLUTE_NORM)
# target diversity (diversity suite, docs/diversity.md): the set's diversity, the stream's decline, correlations
DIV = "diversity suite (Huang et al. 2024)"
_m("efficacy_decline", CF, False, "ES decline", "efficacy right after each edit minus after the last edit")
_m("ppl_after_n", PPL, None, "ppl at", "edits after which ppl_after / ppl_ratio were measured", "edits",
   why=RUN_SETTING)
_m("n_distinct_targets", DIV, None, "targets", "distinct new targets of the set", "targets", why=CASE_SET)
_m("target_entropy", DIV, None, "H(target)", "entropy of the set's new targets", "bits", why=CASE_SET)
_m("n_distinct_target_tokens", DIV, None, "target tokens", "distinct tokens of the set's new targets", "tokens",
   why=CASE_SET)
_m("token_entropy", DIV, None, "H(token)", "entropy over every token of the set's new targets", "bits", why=CASE_SET)
_m("mean_target_tokens", DIV, None, "tokens/target", "mean tokens per new target", "tokens", why=CASE_SET)
_m("target_nll", DIV, None, "target NLL", "mean NLL of the new targets on the unedited model", "nats/token",
   why=CASE_SET)
_m("norm_efficacy_spearman", DIV, None, "rho(L1, ES)", "Spearman of L1 norm and accuracy-so-far along the stream",
   "correlation", why=CORRELATION)
_m("norm_efficacy_pearson", DIV, None, "r(L1, ES)", "Pearson of L1 norm and accuracy-so-far along the stream",
   "correlation", why=CORRELATION)
_m("norm_efficacy_n", DIV, None, "checkpoints", "checkpoints in the norm-accuracy correlation", "checkpoints",
   why=RUN_SETTING)
_m("n_sets", DIV, None, "sets", "diversity sets compared", "sets", why=RUN_SETTING)
for _kind in ("spearman", "pearson"):
    _m(f"diversity_{{measure}}_{_kind}", DIV, None, f"{_kind} diversity-{{measure}}",
       f"{_kind} correlation of target entropy and {{measure}} across one editor's sets", "correlation",
       why=CORRELATION)
for _series, _text in (("ppl_ratio_curve", "[n_edits, ppl / ppl before] on the perplexity schedule"),
                       ("efficacy_curve", "[n_edits, efficacy of every edit made so far] after each edit"),
                       ("l1_curve", "[n_edits, sum |W| over the edited weights] after each edit"),
                       ("l1_growth_curve", "[n_edits, L1 norm / L1 norm before] after each edit"),
                       ("mean_abs_curve", "[n_edits, mean |W| of the edited weights] after each edit"),
                       ("downstream_{task}_curve", "[n_edits, {task} accuracy] at the perplexity checkpoints"),
                       ("efficacy_immediate_each", "each edit's efficacy right after it was made"),
                       ("diversity_table", "per set: diversity and decline after the stream")):
    _m(_series, DIV, None, _series, _text, "series", aggregation="none", why=SERIES)
# downstream (lm-eval)
_m("downstream_{task}_after", "lm-eval zero-shot", True, "{task} after", "lm-eval accuracy on {task} after the edit(s)",
   "accuracy")
_m("downstream_{task}_before", "lm-eval zero-shot", None, "{task} before",
   "lm-eval accuracy on {task} of the unedited model", "accuracy", why=MODEL_PROPERTY)
_m("downstream_{task}_drop", "lm-eval zero-shot", False, "{task} drop", "accuracy before - after on {task}",
   "accuracy", headline=True)
for _corr in ("ppl_downstream_spearman", "ppl_downstream_pearson", "logppl_downstream_pearson"):
    _m(f"{_corr}_{{task}}", "over the states of a sequential run", None, f"{_corr.split('_')[-1]} {{task}}",
       f"{_corr.replace('_', ' ')} correlation between perplexity and {{task}} accuracy", "correlation",
       why=CORRELATION)
_m("corr_states_{task}", "over the states of a sequential run", None, "states {task}",
   "states in the {task} correlation", "states", why=RUN_SETTING)
# causal tracing and the layer sweep (diagnostics of the model, or of where an editor works)
_m("p_clean", TRACE, None, "P clean", "P(answer) of the clean run", "probability", why=DIAGNOSTIC)
_m("p_corrupted", TRACE, None, "P noised", "P(answer) with the subject noised", "probability", why=DIAGNOSTIC)
_m("corruption_drop", TRACE, None, "noise drop", "P clean - P noised", "probability", why=DIAGNOSTIC)
_m("peak_layer_{kind}", TRACE, None, "peak layer {kind}", "layer of the largest {kind} tracing effect", "layer",
   why=LAYER)
_m("max_effect_{kind}", TRACE, None, "max effect {kind}", "largest {kind} tracing effect", "probability",
   why=DIAGNOSTIC)
for _table, _text in (("tracing_effect", "tracing effect per layer (per kind, or mean over swept facts)"),
                      ("tracing_effect_by_kind", "mean tracing effect per layer and kind"),
                      ("tracing_effect_per_fact", "tracing effect per layer and fact"),
                      ("edit_success", "mean edit success per swept layer"),
                      ("edit_success_per_fact", "edit success per layer and fact"),
                      ("efficacy_by_layer", "mean efficacy per swept layer"),
                      ("layers", "swept layers")):
    _m(_table, SWEEP if _table != "tracing_effect" else TRACE, None, _table, _text, "table", aggregation="none",
       why=SERIES)
_m("window", SWEEP, None, "window", "layers edited together", "layers", why=RUN_SETTING)
_m("best_edit_success", SWEEP, True, "best success", "mean edit success at the best swept layer", headline=True)
_m("best_layer", SWEEP, None, "best layer", "swept layer with the best edit success", "layer", why=LAYER)
_m("peak_tracing_layer", SWEEP, None, "peak tracing layer", "swept layer with the largest tracing effect", "layer",
   why=LAYER)
_m("r2_tracing", SWEEP, None, "R2 tracing", "OLS R^2 of edit success on [1, tracing effect]", "R^2", headline=True,
   why=FIT)
_m("r2_layer", SWEEP, None, "R2 layer", "OLS R^2 of edit success on one-hot(layer)", "R^2", headline=True, why=FIT)
_m("r2_both", SWEEP, None, "R2 both", "OLS R^2 of edit success on [one-hot(layer), tracing effect]", "R^2", why=FIT)
_m("n_points", SWEEP, None, "points", "(fact, layer) points in the R^2 fits", "points", why=RUN_SETTING)
_m("r2_tracing_{kind}", SWEEP, None, "R2 tracing {kind}", "R^2 of edit success on the {kind} tracing effect", "R^2",
   why=FIT)
# the five editing problems
_m("rewrite_score", PROBLEM, True, "rewrite", "on the rewrite prompt", "score", headline=True)
_m("paraphrase_score", PROBLEM, True, "paraphrase", "on the paraphrase prompts", "score")
_m("neighborhood_score", PROBLEM, True, "neighbourhood", "neighbourhood prompts left alone", "score")
_m("problem_score", PROBLEM, True, "problem score", "harmonic mean of the three scores", "score", headline=True)
_m("p_target_pre", PROBLEM, None, "P target before", "P(target) on the rewrite prompt before the edit", "probability",
   why=MODEL_PROPERTY)
_m("p_target_post", PROBLEM, None, "P target after", "P(target) on the rewrite prompt after the edit", "probability",
   why=OBJECTIVE)


def _before_edit(name: str, groups: dict[str, str]) -> MetricSpec | None:
    """``<metric>_pre``: the same measurement on the unedited model; a property of the model, no direction."""
    base = REGISTRY.get(groups["base"])
    if base is None:
        return None
    return replace(base, name=name, higher_is_better=None, headline=False, label=f"{base.display} before",
                   description=f"{base.description or base.name}, before the edit", why_no_direction=MODEL_PROPERTY)


REGISTRY.register_family("{base}_pre", _before_edit)
# phase timings (record["timings"]), named timings.<phase>; latency is judged on medians
register_metric(MetricSpec("timings.{phase}", "wall clock (CUDA events on a GPU)", False, "median", "s",
                           "{phase} s", "seconds per record in the {phase} phase (median over records)",
                           relative=True))


# --------------------------------------------------------------------------- values and aggregation
def to_number(value: Any) -> float | None:
    """A recorded value as a float: numbers, bools (0/1) and the run JSON's "inf"/"-inf"; None for anything else
    (null, NaN, text, lists)."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return None if math.isnan(value) else float(value)
    if isinstance(value, str) and value in ("inf", "-inf"):
        return float(value)
    return None


@dataclass(frozen=True)
class Aggregate:
    """An aggregated value with its 95% bootstrap interval over cases (None for "min", or with no data) and n."""

    value: float | None
    low: float | None
    high: float | None
    n: int
    aggregation: str

    def to_json(self) -> dict[str, Any]:
        return {"value": self.value, "ci_low": self.low, "ci_high": self.high, "n": self.n,
                "aggregation": self.aggregation}


_STATISTICS: dict[str, Callable[..., Any]] = {"mean": np.mean, "median": np.median}


def _interval(samples: np.ndarray) -> tuple[float, float]:
    alpha = (1 - CONFIDENCE) / 2
    low, high = np.quantile(samples, [alpha, 1 - alpha], method="nearest" if not np.isfinite(samples).all()
                            else "linear")
    return float(low), float(high)


def aggregate(values: Iterable[Any], aggregation: str = "mean", *, seed: int = BOOTSTRAP_SEED,
              resamples: int = BOOTSTRAP_RESAMPLES) -> Aggregate:
    """THE aggregation: mean or median over cases with a percentile bootstrap interval (cases resampled with
    replacement, ``resamples`` times, a generator seeded with ``seed``), or the minimum ("min": a missing value
    counts as +inf, never reached). Values that are not numbers are left out of n."""
    raw = list(values)
    if aggregation == "min":
        nums = [math.inf if v is None else to_number(v) for v in raw]
        nums = [v for v in nums if v is not None]
        return Aggregate(min(nums) if nums else None, None, None, len(nums), aggregation)
    if aggregation not in _STATISTICS:
        raise ValueError(f"cannot aggregate with {aggregation!r}")
    x = np.array([v for v in map(to_number, raw) if v is not None], dtype=float)
    if x.size == 0:
        return Aggregate(None, None, None, 0, aggregation)
    stat = _STATISTICS[aggregation]
    idx = np.random.default_rng(seed).integers(0, x.size, size=(resamples, x.size))     # [B, n]
    with np.errstate(invalid="ignore"):
        samples = stat(x[idx], axis=1)                                                  # [B]
    low, high = _interval(samples)
    return Aggregate(float(stat(x)), low, high, int(x.size), aggregation)


@dataclass(frozen=True)
class PairedDifference:
    """current vs baseline over shared cases: ``change`` (current - baseline, or current / baseline - 1 when
    relative) of the aggregated values, its 95% paired-bootstrap interval, and n."""

    change: float
    low: float
    high: float
    n: int
    relative: bool


def _change(base: np.ndarray, cur: np.ndarray, stat: Callable[..., Any], relative: bool, axis: int | None = None):
    b, c = stat(base, axis=axis), stat(cur, axis=axis)
    if not relative:
        return c - b
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b == c, 0.0, (c - b) / np.abs(b))


def paired_bootstrap(baseline: Sequence[float], current: Sequence[float], aggregation: str = "mean", *,
                     relative: bool = False, seed: int = BOOTSTRAP_SEED,
                     resamples: int = BOOTSTRAP_RESAMPLES) -> PairedDifference:
    """Change of the aggregated value from ``baseline`` to ``current`` (paired: element i of both is one case),
    with a percentile interval from resampling the cases jointly."""
    b, c = np.asarray(baseline, dtype=float), np.asarray(current, dtype=float)
    if b.shape != c.shape or b.size == 0:
        raise ValueError("paired_bootstrap needs two non-empty sequences of equal length")
    stat = _STATISTICS[aggregation]
    idx = np.random.default_rng(seed).integers(0, b.size, size=(resamples, b.size))     # [B, n]
    samples = _change(b[idx], c[idx], stat, relative, axis=1)                            # [B]
    low, high = _interval(samples)
    return PairedDifference(float(_change(b, c, stat, relative)), low, high, int(b.size), relative)


# --------------------------------------------------------------------------- records of a run, grouped
FAILED_OUTCOMES = ("failed", "error")


@dataclass
class GroupSummary:
    """One (suite, editor) of a run: outcome counts and every metric and phase timing aggregated over its
    non-skipped records (series and tables are left out)."""

    suite: str
    editor: str
    n: int
    passed: int
    failed: int
    skipped: int
    metrics: dict[str, Aggregate]

    def to_json(self) -> dict[str, Any]:
        return {"suite": self.suite, "editor": self.editor, "n": self.n, "passed": self.passed,
                "failed": self.failed, "skipped": self.skipped,
                "metrics": {k: a.to_json() for k, a in self.metrics.items()}}


def record_value(record: dict, name: str) -> Any:
    """A metric of a record, or a phase timing for ``timings.<phase>`` (None when absent)."""
    if name.startswith("timings."):
        timings = record.get("timings")
        return timings.get(name[len("timings."):]) if isinstance(timings, dict) else None
    metrics = record.get("metrics")
    return metrics.get(name) if isinstance(metrics, dict) else None


def record_names(records: Iterable[dict]) -> list[str]:
    """Every metric and ``timings.<phase>`` name in the records, in registry order."""
    names: set[str] = set()
    for r in records:
        metrics, timings = r.get("metrics"), r.get("timings")
        names.update(metrics if isinstance(metrics, dict) else ())
        names.update(f"timings.{p}" for p in (timings if isinstance(timings, dict) else ()))
    return sorted(names, key=REGISTRY.order)


def aggregate_records(records: Sequence[dict], name: str) -> Aggregate | None:
    """``name`` aggregated over ``records`` as its spec says; None for series/tables or when no record has it."""
    spec = metric_spec(name)
    if spec.aggregation == "none":
        return None
    present = [r for r in records if name in (r.get("metrics") or {}) or name.startswith("timings.")]
    values = [record_value(r, name) for r in present]
    if spec.aggregation != "min" and not any(to_number(v) is not None for v in values):
        return None                                  # e.g. a table-valued metric that is not registered
    return aggregate(values, spec.aggregation)


def summarize(records: Iterable[dict]) -> list[GroupSummary]:
    """Per (suite, editor), in order of first appearance: counts and aggregates over non-skipped records."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        if isinstance(r, dict):
            groups.setdefault((str(r.get("suite") or "?"), str(r.get("editor") or "-")), []).append(r)
    out = []
    for (suite, editor), recs in groups.items():
        outcomes = [r.get("outcome") for r in recs]
        active = [r for r in recs if r.get("outcome") != "skipped"]
        metrics = {n: a for n in record_names(active) if (a := aggregate_records(active, n)) is not None}
        out.append(GroupSummary(suite, editor, len(recs), outcomes.count("passed"),
                                sum(o in FAILED_OUTCOMES for o in outcomes), outcomes.count("skipped"), metrics))
    return out


def headline_metrics(names: Iterable[str]) -> list[str]:
    """The headline metrics among ``names`` (registry order): the summary tables' columns."""
    return sorted((n for n in set(names) if (s := get_metric(n)) is not None and s.headline), key=REGISTRY.order)
