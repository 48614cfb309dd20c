"""IKE: In-Context Knowledge Editing (Zheng et al., EMNLP 2023, "Can We Edit Factual Knowledge by In-Context
Learning?").

IKE changes no weight. It edits by prompting: every input the model is asked about is preceded by k demonstrations
and the new fact,

    prefix(f) = d_1 + d_2 + ... + d_k + "New Fact: {prompt} {target_new}\\nPrompt: "
    the model is scored on  prefix(f) + x   for every x (the edit prompt, paraphrases, neighbours, unrelated text)

The demonstrations are built from a pool of training edits (never the evaluated ones), three per pool edit, which
teach the model when to use a new fact and when to ignore it:

    copy     "New Fact: {p} {t}\\nPrompt: {p} {t}\\n\\n"                (the fact itself)
    update   "New Fact: {p} {t}\\nPrompt: {paraphrase of p} {t}\\n\\n"    (a paraphrase uses the new fact)
    retain   "New Fact: {p} {t}\\nPrompt: {unrelated prompt} {its answer}\\n\\n"   (other prompts keep their answer)

and the k retrieved for an edit are those most similar to the query "New Fact: {p} {t}\\nPrompt: {p}\\n\\n",
ordered by ascending similarity (the most similar next to the input, as in the paper).

A sequence of edits keeps every new fact so far: the prefix after edits f_1..f_n holds the demonstrations
retrieved for f_n and one "New Fact:" line per edit, f_1 first.

Reference: zjunlp/EasyEdit ``easyeditor/models/ike/ike_main.py`` and ``util.py`` (demonstration sentences,
retrieval) and ``evaluate/evaluate.py`` ``compute_icl_edit_quality`` (the scored string), settings from
``hparams/IKE/llama-7b.yaml`` (k = 16; the paper uses 32). Divergences:

- similarity is TF-IDF cosine over word tokens (the reference embeds with the sentence encoder all-MiniLM-L6-v2,
  a hub download this harness cannot make); the retrieval is otherwise the same (top-k over all pool sentences);
- demonstrations are ordered by ascending similarity (the paper); the reference keeps the descending order of
  its search;
- pool edits whose subject is the edited subject are never retrieved (a leak guard; the reference relies on
  disjoint splits);
- a built-in pool (``harness/data/builtin/ike_pool.json``, 40 edits written for this project) stands in when no
  training file is given; with a data dir, CounterFact's EasyEdit train split or zsRE's MEND train split;
- several edits (a batch or a stream) share one prefix: the demonstrations retrieved for the newest edit (for a
  batch: for all its facts together) and every new fact so far.
"""
from __future__ import annotations

import math
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..data.case import EditCase
from ..data.pool import PoolRecord, load_pool
from ..models.loading import LoadedModel
from ..tokens import context_length
from .base import Capabilities, Edit, Editor, register_editor

_WORD = re.compile(r"\w+")


@dataclass
class IkeHparams:
    k: int = field(default=16, metadata={"min": 0})  # demonstrations per edit
    pool: str = "builtin"          # "builtin" or a CounterFact (EasyEdit) / zsRE (MEND) train JSON
    pool_limit: int = field(default=0, metadata={"min": 0})  # use the first N pool records (0: all)
    # "ascending" (most similar last, the paper) or "descending" (EasyEdit)
    order: str = field(default="ascending", metadata={"choices": ("ascending", "descending")})


def demonstrations(rec: PoolRecord) -> list[str]:
    """The copy, update and retain demonstrations of one pool edit."""
    fact = f"{rec.prompt} {rec.target_new}"
    return [f"New Fact: {fact}\nPrompt: {fact}\n\n",
            f"New Fact: {fact}\nPrompt: {rec.paraphrase} {rec.target_new}\n\n",
            f"New Fact: {fact}\nPrompt: {rec.locality_prompt} {rec.locality_answer}\n\n"]


class TfidfIndex:
    """TF-IDF vectors (smoothed idf, l2-normalised) of a list of texts, searched by cosine similarity."""

    def __init__(self, texts: Sequence[str]):
        docs = [Counter(_WORD.findall(t.lower())) for t in texts]
        df = Counter(w for d in docs for w in d)
        n = len(docs)
        self.vocab = {w: i for i, w in enumerate(sorted(df))}
        self.idf = torch.tensor([math.log((1 + n) / (1 + df[w])) + 1 for w in sorted(df)])      # [V]
        rows, cols, vals = [], [], []
        for r, d in enumerate(docs):
            for w, c in d.items():
                rows.append(r)
                cols.append(self.vocab[w])
                vals.append(float(c))
        m = torch.sparse_coo_tensor(torch.tensor([rows, cols]), torch.tensor(vals), (n, len(self.vocab)),
                                    check_invariants=True)
        m = (m.coalesce() * self.idf).coalesce()                                                  # [N, V]
        norms = torch.zeros(n).index_add_(0, m.indices()[0], m.values() ** 2).sqrt().clamp(min=1e-12)
        self.matrix = torch.sparse_coo_tensor(m.indices(), m.values() / norms[m.indices()[0]], m.shape,
                                              check_invariants=True)

    def vector(self, text: str) -> torch.Tensor:
        v = torch.zeros(len(self.vocab))
        for w, c in Counter(_WORD.findall(text.lower())).items():
            if w in self.vocab:
                v[self.vocab[w]] = c
        v = v * self.idf
        return v / v.norm().clamp(min=1e-12)

    def scores(self, query: str) -> torch.Tensor:
        """Cosine similarity of ``query`` to every text [N]."""
        return torch.sparse.mm(self.matrix, self.vector(query)[:, None])[:, 0]


@register_editor
class IKE(Editor):
    name = "ike"
    Hparams = IkeHparams
    capabilities = Capabilities(needs_key_stats=False, changes="prompt_prefix", batches=True, values_ahead=False)
    objectives = ("rewrite", "amplify")    # stating a fact in context can write or reinforce it, not erase it

    def __init__(self, hparams: IkeHparams, *, stats=None):
        super().__init__(hparams, stats=stats)
        if hparams.order not in ("ascending", "descending"):
            raise ValueError(f"ike: order {hparams.order!r}; use ascending or descending")
        self._pool: list[PoolRecord] | None = None
        self._sentences: list[str] = []
        self._owner: list[int] = []                # pool record of each sentence
        self._index: TfidfIndex | None = None
        self.facts: list[str] = []                 # "prompt target" of every edit since the last reset
        self.demos: list[str] = []                 # the demonstrations of the newest edit

    # --- pool and retrieval ---------------------------------------------------------------------------------
    def index(self) -> TfidfIndex:
        """The pool's demonstrations and their TF-IDF index, built at first use (once per editor)."""
        if self._index is None:
            self._pool = load_pool(self.hparams.pool, self.hparams.pool_limit or None)
            for i, rec in enumerate(self._pool):
                for s in demonstrations(rec):
                    self._sentences.append(s)
                    self._owner.append(i)
            self._index = TfidfIndex(self._sentences)
        return self._index

    def retrieve(self, cases: Sequence[EditCase]) -> list[str]:
        """The k demonstrations most similar to the cases' query, in the configured order."""
        index = self.index()
        query = "".join(f"New Fact: {c.rewrite_prompt} {c.target_new}\nPrompt: {c.rewrite_prompt}\n\n" for c in cases)
        scores = index.scores(query)
        subjects = {c.subject.strip().lower() for c in cases}
        banned = torch.tensor([self._pool[o].subject.strip().lower() in subjects for o in self._owner])
        scores = scores.masked_fill(banned, float("-inf"))
        k = min(self.hparams.k, int((~banned).sum()))
        top = scores.topk(k).indices.tolist()                     # most similar first
        if self.hparams.order == "ascending":
            top = top[::-1]
        return [self._sentences[i] for i in top]

    def prefix(self) -> str:
        """What precedes every scored input after the edits so far ("" when there is none)."""
        if not self.facts:
            return ""
        return "".join(self.demos) + "".join(f"New Fact: {f}\n" for f in self.facts) + "Prompt: "

    # --- lifecycle ------------------------------------------------------------------------------------------
    def edited_parameters(self, lm: LoadedModel) -> list[str]:
        return []                                  # weights never change

    def reset(self) -> None:
        self.facts, self.demos = [], []

    def state(self) -> dict[str, Any]:
        return {"facts": list(self.facts), "demos": list(self.demos)}

    def load_state(self, state: dict[str, Any]) -> None:
        self.facts, self.demos = list(state.get("facts", [])), list(state.get("demos", []))

    def apply(self, lm: LoadedModel, cases: Sequence[EditCase]) -> Edit:
        if any(c.objective not in self.objectives for c in cases):
            bad = next(c.objective for c in cases if c.objective not in self.objectives)
            raise ValueError(f"IKE states a new fact in context; the {bad!r} editing problem does not apply to it")
        t0 = time.perf_counter()
        before = (list(self.facts), list(self.demos))
        self.demos = self.retrieve(cases)
        self.facts = self.facts + [f"{c.rewrite_prompt} {c.target_new}" for c in cases]
        prefix = self.prefix()
        n_tokens = len(lm.tokenizer(prefix).input_ids)
        limit = context_length(lm.model)
        if limit is not None and n_tokens >= limit - 32:
            self.facts, self.demos = before
            raise ValueError(f"IKE prefix of {n_tokens} tokens leaves no room in the model's {limit}-token context; "
                             f"lower --hparam ike.k (now {self.hparams.k}) or edit fewer facts in one stream")

        def undo() -> None:
            self.facts, self.demos = list(before[0]), list(before[1])

        return Edit(self.name, [c.case_id for c in cases], undo=undo, prompt_prefix=prefix,
                    info={"k": len(self.demos), "prefix_tokens": n_tokens, "n_facts": len(self.facts)},
                    seconds=time.perf_counter() - t0)
