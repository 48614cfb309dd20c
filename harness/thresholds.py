"""Every verdict of the benchmark in one place. A suite measures (``harness.protocols``), records, then asserts
``not thresholds.violations_<suite>(measurement)``: each violation is one line naming the metric, its value, the
threshold and the option that sets it. The threshold values and their defaults come from the option table
(``harness.options.OPTIONS``: ``--collapse-ratio`` / ini ``harness_collapse_ratio``, ...)."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .options import THRESHOLD_DEFAULTS as _D

if TYPE_CHECKING:
    from .protocols.base import Measurement


# Checks of what a suite measured (not options: they hold for any model; each can fail and names what it saw).
# Causal tracing: the probability with one layer's clean state restored (P noised + effect) lies between the noised and
# the clean run's, up to this much (absolute probability; one restored state can overshoot the clean run a little).
TRACE_RESTORED_TOLERANCE = 0.1
# A correlation is a number in [-1, 1] (this much float slack) or undefined (None); never NaN or outside.
CORRELATION_SLACK = 1e-9


def _fmt(x: Any, spec: str = ".3f") -> str:
    return format(x, spec) if isinstance(x, (int, float)) else str(x)


@dataclass
class Thresholds:
    """What the suites assert; each field is an option and an ini value (``harness.options``)."""

    collapse_ppl_ratio: float = _D["collapse_ppl_ratio"]  # perplexity after / before at or above: collapse
    min_efficacy: float = _D["min_efficacy"]              # a single edit: P(new) > P(true), else rewrite_acc
    max_norm_growth: float = _D["max_norm_growth"]        # streams: edited layers' L1 after / before
    min_neighborhood: float = _D["min_neighborhood"]      # locality: neighborhood_retained
    max_kl: float = _D["max_kl"]                          # locality: mean KL(pre || post) on unrelated text, nats
    max_top1_changed: float = _D["max_top1_changed"]      # locality: fraction of unrelated-text top-1 tokens changed
    min_qa_locality: float = _D["min_qa_locality"]        # locality: zsRE/EasyEdit QA locality
    min_wild_efficacy: float = _D["min_wild_efficacy"]    # the generated answer contains target_new (0: report only)
    min_fluency_ratio: float = _D["min_fluency_ratio"]    # generation fluency after / before (0: report only)
    max_accuracy_drop: float = _D["max_accuracy_drop"]    # downstream: accuracy before - after, per task
    min_trace_drop: float = _D["min_trace_drop"]          # tracing: share of P(answer) the subject noise removes
    min_rewrite_score: float = _D["min_rewrite_score"]    # editing problems: share of the possible change achieved
    min_sweep_success: float = _D["min_sweep_success"]    # layer sweep: mean edit success at the best swept layer

    # --- single edits (and HardEdit's single hard edits) ------------------------------------------------------
    def _collapse(self, ratio: float) -> list[str]:
        if math.isfinite(ratio) and ratio < self.collapse_ppl_ratio:
            return []
        return [f"ppl_ratio={ratio:.3f} >= collapse threshold {self.collapse_ppl_ratio} (model collapsed; "
                "--collapse-ratio)"]

    def violations_single_edit(self, m: Measurement) -> list[str]:
        """Collapse, and that the edit took: efficacy success (P(new) > P(true)) where the case has a true target,
        else (QAEdit, KnowEdit recent / WikiBio: no ``target_true`` to compare with) the teacher-forced rewrite
        accuracy of the new target, both against ``--min-efficacy``."""
        out = self._collapse(m.metrics["ppl_ratio"])
        es, acc = m.metrics.get("efficacy_success"), m.metrics.get("rewrite_acc")
        if es is not None and es < self.min_efficacy:
            out.append(f"efficacy_success={es:.3f} < min_efficacy {self.min_efficacy} (edit did not take; "
                       "--min-efficacy)")
        elif es is None and acc is not None and acc < self.min_efficacy:
            out.append(f"rewrite_acc={acc:.3f} < min_efficacy {self.min_efficacy} (edit did not take: the new "
                       "target's tokens are not the top predictions; the case has no true target to compare "
                       "P(new) with; --min-efficacy)")
        return out + self._wild(m) + self._fluency(m)

    def _wild(self, m: Measurement) -> list[str]:
        w = m.metrics.get("wild_rewrite_contains")
        if w is None or w >= self.min_wild_efficacy:
            return []
        answer = (m.info.get("wild_answers") or {}).get("rewrite", [""])[0]
        return [f"wild_rewrite_contains={w:.3f} < min_wild_efficacy {self.min_wild_efficacy} (the model does not "
                f"say the new target when it generates; it said {answer!r}; --min-wild-efficacy)"]

    def _fluency(self, m: Measurement) -> list[str]:
        before, after = m.metrics.get("fluency_pre"), m.metrics.get("fluency")
        if before is None or after is None or before <= 0 or after / before >= self.min_fluency_ratio:
            return []
        return [f"fluency {before:.3f} -> {after:.3f} (ratio {after / before:.3f} < min_fluency_ratio "
                f"{self.min_fluency_ratio}: generated text became repetitive; --min-fluency-ratio)"]

    # --- WILD suite: the edit is made teacher-forced; does the model then say it? -----------------------------
    def violations_wild(self, m: Measurement) -> list[str]:
        acc = m.metrics.get("rewrite_acc")
        out = []
        if acc is not None and acc < self.min_efficacy:
            out.append(f"rewrite_acc={acc:.3f} < min_efficacy {self.min_efficacy} (the edit did not take even "
                       "teacher-forced; --min-efficacy)")
        return out + self._wild(m)

    violations_hardedit = violations_single_edit

    # --- edit streams ------------------------------------------------------------------------------------------
    def _norm_growth(self, m: Measurement) -> list[str]:
        """The D4S paper's tracker: the edited layers' L1 norm (sum |W|) after the stream over before (nan: no
        weights edited, e.g. an editor that hooks modules or edits prompts)."""
        g = m.metrics.get("norm_growth")
        if g is None or math.isnan(g) or g <= self.max_norm_growth:
            return []
        return [f"norm_growth={g:.3f} > max_norm_growth {self.max_norm_growth} (L1 norm of the edited layers "
                f"{_fmt(m.metrics.get('l1_before'), '.4g')} -> {_fmt(m.metrics.get('l1_after'), '.4g')} over "
                f"{m.metrics['n_edits']} edits; --max-norm-growth)"]

    def violations_sequential(self, m: Measurement) -> list[str]:
        n, out = m.metrics["edits_to_collapse"], []
        if n is not None:
            out.append(f"edits_to_collapse={n}: ppl_ratio reached the collapse threshold {self.collapse_ppl_ratio} "
                       f"within {m.metrics['n_edits']} edits (--collapse-ratio)")
        return out + self._norm_growth(m)

    def violations_diversity(self, m: Measurement) -> list[str]:
        """A diversity stream: collapse at any perplexity checkpoint, and norm growth."""
        out = []
        collapsed = [(n, r) for n, r in m.metrics["ppl_ratio_curve"] if not (math.isfinite(r) and
                                                                             r < self.collapse_ppl_ratio)]
        if collapsed:
            n, r = collapsed[0]
            out.append(f"ppl_ratio={r:.3f} after {n} of {m.metrics['n_edits']} edits >= collapse threshold "
                       f"{self.collapse_ppl_ratio} ({m.info.get('diversity_set')} set; --collapse-ratio)")
        return out + self._norm_growth(m)

    def violations_diversity_summary(self, m: Measurement) -> list[str]:
        """The comparison across sets is meaningful: 3 or more sets that differ in target diversity."""
        entropies = {round(row["target_entropy"], 6) for row in m.metrics["diversity_table"]}
        if m.metrics["n_sets"] >= 3 and len(entropies) >= 2:
            return []
        return [f"{m.metrics['n_sets']} set(s) with {len(entropies)} distinct target entropies: diversity against "
                "decline needs 3 or more sets that differ in diversity (--diversity-sets)"]

    # --- locality ------------------------------------------------------------------------------------------------
    def violations_locality(self, m: Measurement) -> list[str]:
        g, out = m.metrics.get, []
        ns = g("neighborhood_retained")
        if ns is not None and ns < self.min_neighborhood:
            out.append(f"neighborhood_retained={ns:.3f} < min_neighborhood {self.min_neighborhood} (the edit "
                       "overrode neighbouring facts the model knew; --min-neighborhood)")
        kl = g("kl_unrelated")
        if kl is not None and not (math.isfinite(kl) and kl <= self.max_kl):
            out.append(f"kl_unrelated={kl:.4g} > max_kl {self.max_kl} (next-token distributions on unrelated text "
                       "drifted; --max-kl)")
        t1 = g("top1_changed")
        if t1 is not None and t1 > self.max_top1_changed:
            out.append(f"top1_changed={t1:.3f} > max_top1_changed {self.max_top1_changed} (--max-top1-changed)")
        qa = g("qa_locality")
        if qa is not None and qa < self.min_qa_locality:
            out.append(f"qa_locality={qa:.3f} < min_qa_locality {self.min_qa_locality} (--min-qa-locality)")
        return out

    # --- downstream ----------------------------------------------------------------------------------------------
    def _accuracy_drops(self, m: Measurement, after: str) -> list[str]:
        out = []
        for key, drop in m.metrics.items():
            task = re.fullmatch(r"downstream_(.+)_drop", key)
            if task and drop is not None and drop > self.max_accuracy_drop:
                t = task.group(1)
                out.append(f"downstream_{t}: accuracy {_fmt(m.metrics.get(f'downstream_{t}_before'))} -> "
                           f"{_fmt(m.metrics.get(f'downstream_{t}_after'))} {after} (drop {drop:.3f} > "
                           f"max_accuracy_drop {self.max_accuracy_drop}; --max-accuracy-drop)")
        return out

    def violations_downstream(self, m: Measurement) -> list[str]:
        return self._accuracy_drops(m, "after the edit")

    def violations_correlation(self, m: Measurement) -> list[str]:
        return self._accuracy_drops(m, f"after {m.metrics['n_edits']} hard edits")

    # --- localization --------------------------------------------------------------------------------------------
    def untraceable(self, m: Measurement) -> str | None:
        """Why a traced fact is left out of the analysis (as in ROME), or None: the subject noise must remove at
        least ``min_trace_drop`` of P(answer), else the prompt gives the answer away."""
        drop = m.metrics["corruption_drop"] / m.metrics["p_clean"]
        if drop >= self.min_trace_drop:
            return None
        return (f"not traceable: the subject noise removes {drop:.2f} of P(answer)={m.metrics['p_clean']:.3f} < "
                f"min_trace_drop {self.min_trace_drop} (the prompt gives the answer away; --min-trace-drop)")

    def violations_tracing(self, m: Measurement) -> list[str]:
        effects = [e for kind in m.metrics["tracing_effect"].values() for e in kind]
        if all(-1.0 <= e <= 1.0 for e in effects) and max(effects) > 0:
            return []
        return [f"tracing effects out of range or never positive (max {max(effects):.3g}): restoring clean states "
                "recovered nothing at any layer"]

    def violations_layer_sweep(self, m: Measurement) -> list[str]:
        best = m.metrics["best_edit_success"]
        if best is None:          # no defined success at any layer: nothing was swept
            why = ("no case was swept: the model predicts the true answer of none of the dataset's cases, so no "
                   "known fact can be edited; use a bigger model, more cases (--data-dir for CounterFact) or "
                   "--sweep-facts" if not m.metrics.get("n_points") else "no swept layer has a defined success")
            return [f"best_edit_success undefined (None): {why} (--min-sweep-success {self.min_sweep_success} "
                    "cannot be checked)"]
        if best >= self.min_sweep_success:
            return []
        return [f"best_edit_success={best:.3f} (layer {m.metrics['best_layer']}) < min_sweep_success "
                f"{self.min_sweep_success}: {m.info.get('editor')} edits no swept layer reliably (--min-sweep-success)"]

    def violations_editing_problems(self, m: Measurement) -> list[str]:
        score = m.metrics["rewrite_score"]
        if score >= self.min_rewrite_score:
            return []
        return [f"rewrite_score={score:.3f} < min_rewrite_score {self.min_rewrite_score} ({m.info.get('problem')}: "
                f"P(target) {m.metrics['p_target_pre']:.3f} -> {m.metrics['p_target_post']:.3f}; "
                "--min-rewrite-score)"]

    # --- checks of the results themselves (module constants above) ----------------------------------------------
    def violations_tracing_results(self, m: Measurement) -> list[str]:
        """A traced fact's numbers: P clean and P noised are probabilities, every effect is finite, and each restored
        probability (P noised + effect) lies between P noised and P clean within ``TRACE_RESTORED_TOLERANCE``."""
        g, tol = m.metrics, TRACE_RESTORED_TOLERANCE
        out = [f"{k}={_fmt(g.get(k))} is not a probability" for k in ("p_clean", "p_corrupted")
               if not (isinstance(g.get(k), (int, float)) and math.isfinite(g[k]) and 0.0 <= g[k] <= 1.0)]
        if out:
            return out
        pc, pn = g["p_clean"], g["p_corrupted"]
        lo, hi = min(pc, pn) - tol, max(pc, pn) + tol
        for kind, effects in g["tracing_effect"].items():
            bad = [(layer, e) for layer, e in enumerate(effects)
                   if not (isinstance(e, (int, float)) and math.isfinite(e) and lo <= pn + e <= hi)]
            if bad:
                layer, e = bad[0]
                restored = _fmt(pn + e if isinstance(e, (int, float)) else e)
                out.append(f"{kind} tracing effect at layer {layer}: restored P={restored} is not between P noised "
                           f"{pn:.3f} and P clean {pc:.3f} (+-{tol}; {len(bad)} of {len(effects)} layers)")
        return out

    def violations_diversity_results(self, m: Measurement, seq_edits: int) -> list[str]:
        """The comparison across sets: every stream made ``seq_edits`` edits (``--seq-edits``), and every correlation
        (across sets, and each stream's norm-accuracy one) is undefined (None) or a finite number in [-1, 1]."""
        out = []
        short = [f"{row.get('set')}: {row.get('n_edits')}" for row in m.metrics["diversity_table"]
                 if row.get("n_edits") != seq_edits]
        if short:
            out.append(f"streams of other lengths than --seq-edits {seq_edits} ({', '.join(short)} edits)")
        values = [(k, v) for k, v in m.metrics.items() if k.endswith(("_spearman", "_pearson"))]
        values += [(f"{row.get('set')}.{k}", v) for row in m.metrics["diversity_table"] for k, v in row.items()
                   if k.endswith(("_spearman", "_pearson"))]
        for k, v in values:
            if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v)
                                      and -1 - CORRELATION_SLACK <= v <= 1 + CORRELATION_SLACK):
                out.append(f"{k}={_fmt(v)} is not a correlation in [-1, 1] (nor undefined)")
        return out
