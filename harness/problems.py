"""The five editing problems of Hase et al. (2023, "Does Localization Inform Editing?") and their layer sweep.

For a CounterFact-style case (s, r, o_true, o_new) whose true answer the model knows:

    error_injection     o_true -> o_new                                    objective "rewrite"
    tracing_reversal    o_true -> o_noise, the model's top answer when the subject is noised (other than o_true)
    fact_erasure        lower P(o_true)                                    objective "erase"
    fact_amplification  raise P(o_true)                                    objective "amplify"
    fact_forcing        raise P(o_true) while the subject's embeddings are noised (during the edit and the scoring)
                                                                           objective "force"

Scores (Hase et al.'s), from the per-token-averaged probability p of the edit target before (pre) and after (post):

    rewrite / paraphrase score   erasure:   max(0, (pre - post) / pre)          the share of p erased
                                 otherwise: max(0, 1 - (1 - post) / (1 - pre))  the share of 1 - p recovered
    neighborhood score           1 - |post - pre| / (|pre - 0.5| + 0.5)        1 = neighbours untouched
    problem_score                harmonic mean of the three

(The reference scores only the first paraphrase and neighbourhood prompt; here every prompt is scored and averaged.)

The layer sweep (``LayerSweep``) edits each fact at each layer (error injection; ROME at window 1, MEMIT or FT-L over
a window of layers) and pairs the edit success (the rewrite score) with the fact's tracing effect at that layer for
``harness.tracing.localization_r2``.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass, field
from statistics import harmonic_mean, mean
from typing import Any

import numpy as np
import torch

from .data.case import EditCase
from .tokens import encode_target, pad_batch
from .metrics.scoring import score_targets
from .models.loading import LoadedModel
from .tracing import (
    KINDS,
    CausalTracer,
    TraceResult,
    localization_r2,
    noised_embeddings,
    subject_token_range,
    window_layers,
)

PROBLEMS = ("error_injection", "tracing_reversal", "fact_erasure", "fact_amplification", "fact_forcing")
OBJECTIVE = {"error_injection": "rewrite", "tracing_reversal": "rewrite", "fact_erasure": "erase",
             "fact_amplification": "amplify", "fact_forcing": "force"}
PROTOCOL = "hase2023 (rewrite/paraphrase: share of the possible change achieved; neighborhood: 1 - scaled |change|)"

Edited = Callable[[EditCase], ContextManager[Any]]   # applies an edit for the block, restores after


# --- which facts the model knows ----------------------------------------------------------------------------
@torch.no_grad()
def top1_matches(lm: LoadedModel, prompts: Sequence[str], answers: Sequence[str], batch_size: int = 32
                 ) -> list[bool]:
    """For each prompt: is the answer's first token the model's top next-token prediction? (batched)"""
    tok, out = lm.tokenizer, []
    for s in range(0, len(prompts), batch_size):
        seqs = [tok(p).input_ids for p in prompts[s:s + batch_size]]
        ids, mask = pad_batch(seqs, tok.pad_token_id)
        hidden = lm.model.base_model(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device)).last_hidden_state
        last = hidden[torch.arange(len(seqs)), torch.tensor([len(q) - 1 for q in seqs])]         # [n, d]
        top = lm.model.get_output_embeddings()(last).argmax(-1).tolist()
        out += [t == encode_target(tok, a)[0] for t, a in zip(top, answers[s:s + batch_size])]
    return out


def first_known(lm: LoadedModel, items: Sequence, prompt: Callable[[Any], str], answer: Callable[[Any], str],
                limit: int | None = None) -> list:
    """The items (in order) whose answer's first token the model predicts top-1 after their prompt, the first
    ``limit`` of them; checked in batches, stopping once the limit is reached."""
    out: list = []
    for s in range(0, len(items), 64):
        chunk = items[s:s + 64]
        out += [x for x, ok in zip(chunk, top1_matches(lm, [prompt(x) for x in chunk], [answer(x) for x in chunk]))
                if ok]
        if limit is not None and len(out) >= limit:
            return out[:limit]
    return out


def known_cases(lm: LoadedModel, cases: Sequence[EditCase], limit: int | None = None) -> list[EditCase]:
    """The cases whose ``target_true`` the model predicts (top-1 first token) on the rewrite prompt, in order."""
    return first_known(lm, [c for c in cases if c.target_true], lambda c: c.rewrite_prompt, lambda c: c.target_true,
                       limit)


def why_no_known_cases(cases: Sequence[EditCase], dataset: str) -> str:
    """One line saying why ``known_cases`` found none of ``cases`` (the whole of ``dataset``) and what to pass."""
    with_truth = [c for c in cases if c.target_true]
    if not with_truth:
        return (f"no known cases: none of the {len(cases)} cases of --dataset {dataset} has a true answer "
                "(target_true) for the model to know; use a dataset with one (builtin, or counterfact with --data-dir)")
    return (f"no known cases: the model predicts (top-1) the true answer of none of the {len(with_truth)} cases of "
            f"--dataset {dataset} that have one, so there is no known fact to edit; use a bigger model or a dataset "
            "with more facts it knows (counterfact with --data-dir)")


# --- problem construction -----------------------------------------------------------------------------------
def noised_answer(tracer: CausalTracer, case: EditCase) -> str:
    """The model's top next token with the subject noised (averaged over the tracer's draws), excluding the true
    answer's first token, as a target string."""
    tok = tracer.lm.tokenizer
    dist = tracer.corrupted_distribution(case.rewrite_prompt, case.subject).clone()
    if case.target_true:
        dist[encode_target(tok, case.target_true)[0]] = -1.0
    for token_id in torch.argsort(dist, descending=True).tolist():
        text = tok.decode([token_id]).strip()
        if text and text != (case.target_true or "").strip():
            return text
    raise ValueError(f"case {case.case_id}: no usable noised prediction")


def problem_case(case: EditCase, problem: str, tracer: CausalTracer, seed: int = 0) -> EditCase:
    """The edit request of ``problem`` for ``case`` (targets and objective set as in Hase et al.)."""
    if problem not in PROBLEMS:
        raise ValueError(f"unknown editing problem {problem!r}; use one of {', '.join(PROBLEMS)}")
    if case.target_true is None:
        raise ValueError(f"case {case.case_id}: editing problems need target_true (the fact the model knows)")
    if problem == "error_injection":
        return case
    if problem == "tracing_reversal":
        return case.with_targets(noised_answer(tracer, case), case.target_true)
    true = case.with_targets(case.target_true, case.target_true)
    if problem == "fact_forcing":
        return true.with_objective("force", noise_std=tracer.noise * tracer.sigma, noise_seed=seed)
    return true.with_objective(OBJECTIVE[problem])


# --- scoring ------------------------------------------------------------------------------------------------
def target_probs(lm: LoadedModel, prompts: Sequence[str], target: str, *, subject: str | None = None,
                 tracer: CausalTracer | None = None, prefix: str = "") -> list[float]:
    """Per-token-averaged P(target | prompt) for each prompt (after an in-context editor's ``prefix``). With
    ``tracer`` and ``subject``, prompts holding the subject are scored with the subject's embeddings noised (mean
    over the tracer's noise draws)."""
    if tracer is None or subject is None:
        return [s.prob for s in score_targets(lm.model, lm.tokenizer, list(prompts), [target] * len(prompts),
                                              prefix=prefix)]
    out = []
    for p in prompts:
        if subject not in p:
            out.append(score_targets(lm.model, lm.tokenizer, [p], [target])[0].prob)
            continue
        span = subject_token_range(lm.tokenizer, p, subject)
        noise = tracer.noise_draws(span[1] - span[0]).to(lm.device)                    # [S, e - b, d]
        with noised_embeddings(lm, slice(None), span, noise):
            scores = score_targets(lm.model, lm.tokenizer, [p] * tracer.samples, [target] * tracer.samples)
        out.append(float(np.mean([s.prob for s in scores])))
    return out


def change_score(pre: float, post: float, erase: bool) -> float:
    """Rewrite/paraphrase score: the share of the possible change achieved (never negative)."""
    if erase:
        return max(0.0, (pre - post) / pre) if pre > 0 else 0.0
    return max(0.0, 1.0 - (1.0 - post) / (1.0 - pre)) if pre < 1 else 0.0


def neighborhood_score(pre: float, post: float) -> float:
    """1 - |post - pre| / (|pre - 0.5| + 0.5): 1 when the neighbour's probability did not move."""
    return 1.0 - abs(post - pre) / (abs(pre - 0.5) + 0.5)


@dataclass
class ProblemProbs:
    rewrite: list[float]
    paraphrase: list[float]
    neighborhood: list[float]


def problem_probs(lm: LoadedModel, case: EditCase, tracer: CausalTracer | None, prefix: str = "") -> ProblemProbs:
    """P(edit target) on the rewrite, paraphrase and neighbourhood prompts (noised subject for "force"; after an
    in-context editor's ``prefix``)."""
    noisy = tracer if case.objective == "force" else None
    groups = [[case.rewrite_prompt], list(case.paraphrase_prompts), list(case.neighborhood_prompts)]
    return ProblemProbs(*(target_probs(lm, g, case.target_new, subject=case.subject, tracer=noisy, prefix=prefix)
                          if g else [] for g in groups))


def problem_scores(pre: ProblemProbs, post: ProblemProbs, erase: bool) -> dict[str, float | None]:
    out: dict[str, float | None] = {
        "rewrite_score": mean(change_score(a, b, erase) for a, b in zip(pre.rewrite, post.rewrite)),
        "paraphrase_score": (mean(change_score(a, b, erase) for a, b in zip(pre.paraphrase, post.paraphrase))
                             if pre.paraphrase else None),
        "neighborhood_score": (mean(neighborhood_score(a, b) for a, b in zip(pre.neighborhood, post.neighborhood))
                               if pre.neighborhood else None),
        "p_target_pre": pre.rewrite[0], "p_target_post": post.rewrite[0]}
    parts = [v for k, v in out.items() if k.endswith("_score") and v is not None]
    out["problem_score"] = harmonic_mean(parts) if parts and min(parts) > 0 else 0.0
    return out


def run_problem(lm: LoadedModel, case: EditCase, problem: str, tracer: CausalTracer, edited: Edited,
                seed: int = 0) -> tuple[dict[str, Any], dict[str, Any]]:
    """Build ``problem``'s request for ``case``, score before, edit, score after (the model is restored by
    ``edited``). Returns (metrics, info)."""
    request = problem_case(case, problem, tracer, seed=seed)
    pre = problem_probs(lm, request, tracer)
    with edited(request) as edit:
        post = problem_probs(lm, request, tracer, prefix=getattr(edit, "prompt_prefix", ""))
    metrics = problem_scores(pre, post, erase=request.objective == "erase")
    info = {"problem": problem, "objective": request.objective, "target": request.target_new,
            "target_true": case.target_true, **(getattr(edit, "info", None) or {})}
    return metrics, info


def problem_unsupported(editor, problem: str) -> str | None:
    """Why ``editor`` cannot be asked ``problem`` (its ``objectives``, when it declares them, lack the problem's
    objective: e.g. IKE states facts in context and cannot erase one), or None."""
    allowed = getattr(editor, "objectives", None)
    objective = OBJECTIVE.get(problem, "rewrite")
    if allowed is None or objective in allowed:
        return None
    return (f"editor {editor.name!r} supports the objectives {', '.join(allowed)}; {problem} needs "
            f"{objective!r}")


# --- the layer sweep ---------------------------------------------------------------------------------------
def sweep_unsupported(editor, window: int) -> str | None:
    """Why ``editor`` cannot be swept over layers with editing windows of ``window`` layers, or None."""
    hp = editor.hparams
    if hasattr(hp, "layers"):
        return None
    if hasattr(hp, "layer"):
        return None if window == 1 else (f"editor {editor.name!r} edits one layer; a window of {window} layers "
                                         "needs an editor with a 'layers' hyper-parameter (memit, ft)")
    return f"editor {editor.name!r} has no 'layer' or 'layers' hyper-parameter to sweep"


def place_editor(editor, lm: LoadedModel, center: int, window: int) -> list[int]:
    """Point ``editor`` (an instance the sweep owns) at the window of layers centred on ``center``."""
    reason = sweep_unsupported(editor, window)
    if reason:
        raise ValueError(reason)
    layers = window_layers(center, window, lm.n_layers)
    if hasattr(editor.hparams, "layers"):
        editor.hparams.layers = layers
    else:
        editor.hparams.layer = center
    editor.prepare(lm)
    return layers


@dataclass
class SweepResult:
    layers: list[int]
    window: int
    case_ids: list[str]
    edit_success: list[list[float]]                                  # [fact][layer] rewrite score
    efficacy: list[list[float]]                                      # [fact][layer] P(new) > P(true)
    tracing: dict[str, list[list[float]]] = field(default_factory=dict)   # kind -> [fact][layer] effect

    def r2(self, kind: str = "hidden") -> dict[str, float]:
        n = len(self.layers)
        xs = [t[i] for t in self.tracing[kind] for i in range(n)]
        ys = [s[i] for s in self.edit_success for i in range(n)]
        return localization_r2(self.layers * len(self.case_ids), xs, ys)

    def metrics(self, kind: str = "hidden") -> dict[str, Any]:
        """Run-JSON metrics: per-layer means, the R^2 comparison, and the per-fact tables. Means, maxima and fits
        are taken over the defined values only: a layer no fact has a value for is None, and so are the best layer,
        its success and the R^2 of a sweep without facts (the verdict says why), never NaN."""
        def mean_over(rows: Sequence[Sequence[float]]) -> list[float | None]:
            out = []
            for i in range(len(self.layers)):
                values = [float(r[i]) for r in rows if r[i] is not None and math.isfinite(r[i])]
                out.append(float(np.mean(values)) if values else None)
            return out

        out: dict[str, Any] = {
            "layers": self.layers, "window": self.window,
            "tracing_effect": mean_over(self.tracing[kind]), "edit_success": mean_over(self.edit_success),
            "efficacy_by_layer": mean_over(self.efficacy),
            "tracing_effect_by_kind": {k: mean_over(v) for k, v in self.tracing.items()},
            "tracing_effect_per_fact": dict(zip(self.case_ids, self.tracing[kind])),
            "edit_success_per_fact": dict(zip(self.case_ids, self.edit_success)),
        }
        out.update(self.r2(kind))
        for k in self.tracing:
            if k != kind:
                out[f"r2_tracing_{k}"] = self.r2(k)["r2_tracing"]
        best = _argmax_defined(out["edit_success"])
        out["best_layer"] = None if best is None else self.layers[best]
        out["best_edit_success"] = None if best is None else out["edit_success"][best]
        peak = _argmax_defined(out["tracing_effect"])
        out["peak_tracing_layer"] = None if peak is None else self.layers[peak]
        return out


def _argmax_defined(values: Sequence[float | None]) -> int | None:
    """Index of the largest defined value (first on ties), or None when there is none."""
    defined = [(v, -i) for i, v in enumerate(values) if v is not None]
    return -max(defined)[1] if defined else None


class LayerSweep:
    """Edits each case at each layer with one editor instance that it owns (its layer hyper-parameters change per
    point); ``trace`` supplies each case's tracing (a cache owner may memoise it)."""

    def __init__(self, lm: LoadedModel, editor, edited: Callable[[Any, EditCase], ContextManager[Any]],
                 trace: Callable[[EditCase], TraceResult], window: int = 1, progress: Callable[[str], None] | None = None):
        self.lm, self.editor, self.edited, self.trace = lm, editor, edited, trace
        self.window = int(window)
        self.progress = progress or (lambda _msg: None)

    def run(self, cases: Sequence[EditCase], layers: Sequence[int], kinds: Sequence[str] = KINDS) -> SweepResult:
        layers = [int(x) for x in layers]
        result = SweepResult(layers, self.window, [c.case_id for c in cases], [], [],
                             {k: [] for k in kinds})
        for case in cases:
            traced = self.trace(case)
            for k in kinds:
                result.tracing[k].append([traced.effects[k][layer] for layer in layers])
            pre_new = target_probs(self.lm, [case.rewrite_prompt], case.target_new)[0]
            pre_true = target_probs(self.lm, [case.rewrite_prompt], case.target_true or "")[0]
            success, eff = [], []
            for layer in layers:
                place_editor(self.editor, self.lm, layer, self.window)
                with self.edited(self.editor, case):
                    post_new = target_probs(self.lm, [case.rewrite_prompt], case.target_new)[0]
                    post_true = target_probs(self.lm, [case.rewrite_prompt], case.target_true or "")[0]
                success.append(change_score(pre_new, post_new, erase=False))
                eff.append(float(post_new > post_true))
                self.progress(f"{self.editor.name} w{self.window} {case.case_id} layer {layer}: "
                              f"rewrite score {success[-1]:.3f} (P(new) {pre_new:.3f} -> {post_new:.3f}; "
                              f"P(true) {pre_true:.3f} -> {post_true:.3f})")
            result.edit_success.append(success)
            result.efficacy.append(eff)
        return result

