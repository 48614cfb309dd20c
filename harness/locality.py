"""Locality: what an edit should leave alone.

Three measurements, each against the unedited model:

* **Neighbourhood** (ROME's NS / NM on CounterFact): on prompts about other subjects with the same relation and the
  same true answer, the true fact must still beat the edit's new target (``harness.metrics.counterfact``).
  ``neighborhood_retained`` is NS restricted to the neighbour prompts where the unedited model already ranks the true
  fact first (P(true) > P(new)): the fraction where it still does after the edit. It is what the threshold checks,
  so a neighbour the model never knew does not count against the editor.
* **Distribution drift on unrelated text**: over a general passage set (ME-PPL or the built-in sentences), at every
  position t that predicts a next token, with P_t the pre-edit and Q_t the post-edit next-token distribution:

      kl_unrelated  = (1 / N) sum_t KL(P_t || Q_t) = (1 / N) sum_t sum_v P_t(v) (log P_t(v) - log Q_t(v))   [nats]
      top1_changed  = (1 / N) sum_t [argmax_v P_t(v) != argmax_v Q_t(v)]

  N is the number of predicted positions over all texts (token-weighted). The pre-edit side is stored as the final
  hidden states h_t ([N, d], a few MB) rather than [N, V] probabilities: P_t = softmax(W_head h_t) is recomputed
  with the output head, whose digest is checked to be unchanged (no editor here edits it).
* **QA locality** (zsRE's NQ questions ``loc`` -> ``loc_ans``; EasyEdit/KnowEdit locality pairs): the answer is
  teacher-forced after the question; ``qa_locality`` is EasyEdit's locality, the fraction of answer positions whose
  argmax token is the same after the edit as before; ``qa_locality_acc`` is the argmax accuracy against the
  answer tokens (MEND/ROME's zsRE "specificity"), before (``_pre``) and after.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from statistics import fmean
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .tokens import encode_target, pad_batch, token_budget_batches
from .metrics.prefix import SharedPrefix, hidden_states, shared_prefix
from .metrics.scoring import score_targets
from .models.snapshot import param_digest

if TYPE_CHECKING:
    from .data.case import EditCase

PROTOCOLS = {
    "kl_unrelated": "mean over predicted positions of KL(P_pre || P_post) of the next-token distribution (nats), "
                    "general text",
    "top1_changed": "fraction of predicted positions whose top-1 next token changed, general text",
    "neighborhood_retained": "fraction of neighbourhood prompts with P(true) > P(new) before the edit that keep it "
                             "after (per-token-averaged probabilities, as rome-counterfact)",
    "qa_locality": "easyedit locality: fraction of teacher-forced answer positions (loc -> loc_ans) whose argmax "
                   "token is unchanged by the edit",
    "qa_locality_acc": "teacher-forced argmax accuracy of loc_ans after loc, after the edit (zsRE specificity)",
    "qa_locality_acc_pre": "teacher-forced argmax accuracy of loc_ans after loc, before the edit",
}


def _head_name(model) -> str:
    w = model.get_output_embeddings().weight
    return next(n for n, p in model.named_parameters() if p is w)


@torch.no_grad()
def final_hidden(model, tok, texts: Sequence[str], *, prefix_ids: Sequence[int] = (), max_len: int = 512,
                 max_tokens_per_batch: int = 4096) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Per text: its token ids (``tok(text)``, at most ``max_len``) and the final hidden states at the positions that
    predict tokens 1..T-1, [T-1, d] (float32, on the model's device). ``prefix_ids`` are prepended to every text
    (in-context editors) and their positions left out."""
    body = model.base_model
    device = next(model.parameters()).device
    encoded = [tok(t).input_ids[:max_len] for t in texts]
    out: list[torch.Tensor | None] = [None] * len(texts)
    order = sorted((i for i in range(len(encoded)) if len(encoded[i]) >= 2), key=lambda i: len(encoded[i]))
    if not order:
        raise ValueError("distribution drift needs texts of at least two tokens")
    shared = SharedPrefix(body, prefix_ids, device) if prefix_ids else None    # the prefix runs once
    for batch in token_budget_batches([len(encoded[i]) for i in order], max_tokens_per_batch,
                                      max_batch=shared.max_rows() if shared else None):
        idx = [order[b] for b in batch]
        ids, mask = pad_batch([encoded[i] for i in idx], tok.pad_token_id, device=device)
        hidden = hidden_states(body, ids, mask, shared)                                        # [b, T, d]
        for r, i in enumerate(idx):
            out[i] = hidden[r, :len(encoded[i]) - 1].float()                                   # [T_i - 1, d]
    keep = [i for i in range(len(texts)) if out[i] is not None]
    return [encoded[i] for i in keep], [out[i] for i in keep]  # type: ignore[misc]


@dataclass
class DriftReference:
    """The unedited model's final hidden states on the general texts, and the output head it was read with."""

    texts: list[str]
    ids: list[list[int]]
    hidden: torch.Tensor          # [N, d], all texts' predicted positions concatenated
    head_name: str
    head_digest: str

    @classmethod
    def build(cls, model, tok, texts: Sequence[str]) -> DriftReference:
        ids, hidden = final_hidden(model, tok, texts)
        name = _head_name(model)
        return cls(list(texts), ids, torch.cat(hidden), name, param_digest(model, [name]))

    @property
    def n_positions(self) -> int:
        return int(self.hidden.shape[0])


@torch.no_grad()
def distribution_drift(model, tok, ref: DriftReference, *, prefix: str = "", chunk: int = 512) -> dict[str, float]:
    """``kl_unrelated`` and ``top1_changed`` of the current (edited) model against ``ref`` (module docstring)."""
    if param_digest(model, [ref.head_name]) != ref.head_digest:
        raise RuntimeError(f"the output head {ref.head_name} changed: the pre-edit distributions cannot be "
                           "recomputed from stored hidden states")
    prefix_ids = tok(prefix).input_ids if prefix else []
    ids, hidden = final_hidden(model, tok, ref.texts, prefix_ids=prefix_ids)
    if [len(x) for x in ids] != [len(x) for x in ref.ids]:
        raise RuntimeError("the texts tokenise differently than when the drift reference was built")
    post = torch.cat(hidden)                                                                   # [N, d]
    head = model.get_output_embeddings()
    pre = ref.hidden.to(post.device)
    kl_sum, changed, n = 0.0, 0, pre.shape[0]
    for c in range(0, n, chunk):
        logp = F.log_softmax(head(pre[c:c + chunk]).float(), -1)                               # [c, V] pre-edit
        logq = F.log_softmax(head(post[c:c + chunk]).float(), -1)                              # [c, V] post-edit
        kl = (logp.exp() * (logp - logq)).sum(-1)                                              # [c]
        kl_sum += float(kl.double().sum())
        changed += int((logp.argmax(-1) != logq.argmax(-1)).sum())
    return {"kl_unrelated": kl_sum / n, "top1_changed": changed / n, "drift_positions": n}


@torch.no_grad()
def answer_argmax(model, tok, pairs: Sequence[tuple[str, str]], *, prefix: str = ""
                  ) -> list[tuple[list[int], list[int]]]:
    """For each (question, answer): the argmax token at every answer position under teacher forcing, and the
    answer's token ids (answer with a leading space, as in ``score_targets``)."""
    head, body = model.get_output_embeddings(), model.base_model
    device = next(model.parameters()).device
    seqs = [(tok(prefix + q).input_ids, encode_target(tok, a)) for q, a in pairs]
    # an in-context editor's prefix: its longest token prefix common to every question runs once (SharedPrefix)
    shared, c = shared_prefix(body, [q for q, _ in seqs], tok(prefix).input_ids if prefix else [],
                              [len(q) - 1 for q, _ in seqs], device)
    out = []
    for q_ids, a_ids in seqs:   # a handful per case: one forward each keeps this simple
        ids = torch.tensor([(q_ids + a_ids)[c:]], device=device)
        hidden = hidden_states(body, ids, torch.ones_like(ids), shared)[0]                    # [T - c, d]
        pos = torch.arange(len(q_ids) - 1 - c, len(q_ids) - 1 - c + len(a_ids), device=device)  # predict a_ids[j]
        out.append((head(hidden[pos]).argmax(-1).tolist(), a_ids))
    return out


def neighbour_wins(model, tok, case: EditCase, *, prefix: str = "") -> list[bool]:
    """Per neighbourhood prompt: P(target_true) > P(target_new) (ROME's per-token-averaged probabilities)."""
    prompts = list(case.neighborhood_prompts)
    if not prompts or case.target_true is None:
        return []
    targets = [case.target_new] * len(prompts) + [case.target_true] * len(prompts)
    scores = score_targets(model, tok, prompts * 2, targets, prefix=prefix)
    return [t.prob > n.prob for n, t in zip(scores[:len(prompts)], scores[len(prompts):])]


def retained(pre: list[bool], post: list[bool]) -> float | None:
    """Fraction of the prompts won before that are still won after; None when none was won before."""
    kept = [b for a, b in zip(pre, post) if a]
    return sum(kept) / len(kept) if kept else None


def qa_locality(pre: list[tuple[list[int], list[int]]], post: list[tuple[list[int], list[int]]]) -> dict[str, float]:
    """``qa_locality`` (post argmax == pre argmax), ``qa_locality_acc_pre`` / ``qa_locality_acc`` (argmax == gold),
    each a mean over pairs of the mean over answer positions."""
    agree = [fmean(float(a == b) for a, b in zip(p[0], q[0])) for p, q in zip(pre, post)]
    acc_pre = [fmean(float(a == g) for a, g in zip(p[0], p[1])) for p in pre]
    acc_post = [fmean(float(a == g) for a, g in zip(q[0], q[1])) for q in post]
    return {"qa_locality": fmean(agree), "qa_locality_acc_pre": fmean(acc_pre), "qa_locality_acc": fmean(acc_post)}
