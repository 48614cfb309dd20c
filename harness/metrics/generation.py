"""ROME's generation metrics for CounterFact (Meng et al., 2022, section 3.2 and appendix; the reference code is
``experiments/py/eval_utils_counterfact.py``: ``test_generation``, ``n_gram_entropy``, ``tfidf_similarity``).

The edited model writes free text from the case's ``generation_prompts`` (top-k sampling, k = 5, up to 100 tokens
counting the prompt, as ROME's ``generate_fast``), and two numbers summarise it:

* **fluency** (ROME's "generation entropy", ``ngram_entropy``): for each text the weighted mean of the bigram and
  trigram entropies in bits, weights 2/3 and 4/3, then the mean over texts:

      H_n(text) = - sum_g f_g log2 f_g   over the n-grams g of the text's words, f_g their relative frequencies
      fluency   = mean_text  (2/3 H_2 + 4/3 H_3) / 2

  Repetitive text ("Rome Rome Rome ...") has low entropy: a collapsed model's fluency falls, which makes it a second
  collapse surrogate beside perplexity (KnowEdit reports the same number, x100, as "Fluency").
* **consistency** (ROME's "reference score"): TF-IDF cosine similarity between all generated texts joined and the
  reference texts about the new target joined.

Where this differs from ROME, and why:

* ROME's reference texts are Wikipedia snippets about other subjects with the same (relation, target_new)
  (``attribute_snippets.json``), and its IDF is fit on those snippets. That file is not available here. The
  reference texts used instead are the case's ``attribute_prompts`` completed with ``target_new`` ("Bellingshausen
  Sea is in Antarctica"): statements about other subjects that truly have the new attribute, the same selection rule
  at sentence length. The IDF is fit on CounterFact's own texts in the data dir (:func:`counterfact_documents`: one
  document per record, every prompt of the record filled in with its answers), or on the built-in sets without a
  data dir. Absolute consistency values are therefore not comparable with ROME's tables; before/after differences
  on the same vectorizer are.
* Words are split as ``nltk.word_tokenize`` does (Treebank rules per sentence), with sentences cut at ``.!?`` and
  white space instead of the Punkt model, which needs a download (``punkt_tab``) that an offline machine lacks.
* Sampling is seeded (``seed``) through a forked RNG, so a measurement is repeatable and the global RNG untouched;
  generation stops at EOS (ROME's loop runs to the length limit and strips EOS text afterwards).
* Cases without generation prompts (HardEdit's) are generated from the edit prompt and its paraphrases, as
  EasyEdit's ``test_generation_quality`` generates from the rewrite prompts.
"""
from __future__ import annotations

import json
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from statistics import fmean
from typing import Any

import torch
from transformers import GenerationConfig

from ..tokens import check_context, pad_batch, token_budget_batches

PROTOCOLS: dict[str, str] = {
    "fluency": "rome-generation: mean over generated texts of (2/3 H2 + 4/3 H3)/2, H_n the n-gram entropy in bits "
               "(top-5 sampling, 100 tokens with the prompt)",
    "consistency": "rome-generation: TF-IDF cosine between the generated texts and target_new completions of the "
                   "attribute prompts (IDF fit on CounterFact texts)",
}
# For the metric registry (``MetricSpec`` keyword arguments; ``fluency_pre`` / ``consistency_pre`` are the
# registry's generic before-edit family).
METRIC_SPECS: tuple[dict[str, Any], ...] = (
    dict(name="fluency", protocol=PROTOCOLS["fluency"], higher_is_better=True, aggregation="mean", unit="bits",
         label="fluency", description="n-gram entropy of text generated after the edit (falls when a model "
                                      "repeats itself)"),
    dict(name="consistency", protocol=PROTOCOLS["consistency"], higher_is_better=True, aggregation="mean",
         unit="cosine", label="consistency", description="TF-IDF similarity of generated text to statements "
                                                         "about the new target"),
)
NGRAM_ORDERS = (2, 3)
NGRAM_WEIGHTS = (2 / 3, 4 / 3)

_SENTENCES = re.compile(r"(?<=[.!?])\s+")


# ------------------------------------------------------------------------------------------------------- fluency

def word_tokenize(text: str) -> list[str]:
    """Words and punctuation as ``nltk.word_tokenize`` splits them (sentences cut at ``.!?`` + space)."""
    from nltk.tokenize import NLTKWordTokenizer

    tokenizer = NLTKWordTokenizer()
    return [w for sentence in _SENTENCES.split(text) if sentence.strip() for w in tokenizer.tokenize(sentence)]


def ngram_entropy(text: str, orders: Sequence[int] = NGRAM_ORDERS, weights: Sequence[float] = NGRAM_WEIGHTS
                  ) -> float:
    """ROME's ``compute_n_gram_entropy``: arithmetic mean over n of weight_n x H_n (bits); 0 for no n-grams."""
    words = word_tokenize(text)
    parts = []
    for n, w in zip(orders, weights):
        counts = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
        total = sum(counts.values())
        h = -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0
        parts.append(w * h)
    return fmean(parts)


def fluency(texts: Sequence[str]) -> float:
    """ROME's ``n_gram_entropy`` (arithmetic aggregation): the mean n-gram entropy of ``texts``."""
    if not texts:
        raise ValueError("fluency needs at least one text")
    return fmean(ngram_entropy(t) for t in texts)


# --------------------------------------------------------------------------------------------------- consistency

def fit_tfidf(documents: Sequence[str]):
    """A scikit-learn ``TfidfVectorizer`` with ROME's (default) settings fit on ``documents``."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    if not documents:
        raise ValueError("the TF-IDF vectorizer needs at least one document")
    return TfidfVectorizer().fit(documents)


def tfidf_similarity(text_a: str, text_b: str, vectorizer) -> float:
    """Cosine similarity of the two texts' TF-IDF vectors (0 when either has no known word; ROME gives NaN)."""
    a, b = vectorizer.transform([text_a, text_b]).toarray()
    na, nb = float((a @ a) ** 0.5), float((b @ b) ** 0.5)
    return float(a @ b) / (na * nb) if na > 0 and nb > 0 else 0.0


def reference_texts(case) -> list[str]:
    """Statements about other subjects that have ``target_new``: attribute prompts completed with it."""
    return [f"{p} {case.target_new}" for p in case.attribute_prompts]


def _record_texts(rec: dict[str, Any]) -> str:
    """One CounterFact record (ROME or EasyEdit form) as one document: its prompts filled in with the answers."""
    if "requested_rewrite" in rec:
        rr = rec["requested_rewrite"]
        new, true = rr["target_new"]["str"], rr["target_true"]["str"]
        parts = [f"{rr['prompt'].format(rr['subject'])} {true}", *(f"{p} {true}" for p in rec["paraphrase_prompts"]),
                 *(f"{p} {true}" for p in rec["neighborhood_prompts"]),
                 *(f"{p} {new}" for p in rec["attribute_prompts"]), *rec["generation_prompts"]]
    else:
        parts = [f"{rec['prompt']} {rec.get('ground_truth', '')}", f"{rec.get('rephrase_prompt', '')}",
                 f"{rec.get('locality_prompt', '')} {rec.get('locality_ground_truth', '')}", rec["target_new"]]
    return " ".join(p for p in parts if p.strip())


COUNTERFACT_FILES = ("counterfact/counterfact_rome_sample500.json", "counterfact/counterfact_easyedit_train.json",
                     "counterfact/counterfact_easyedit_val.json", "counterfact/counterfact_easyedit_edit.json")


def counterfact_documents(data_dir: str | Path | None, builtin: Iterable[str] = ()) -> list[str]:
    """IDF documents: one per CounterFact record in ``data_dir`` (ROME sample and EasyEdit splits, each case_id
    once), else the ``builtin`` texts. A data dir without any CounterFact file is an error naming the files."""
    if data_dir is None:
        docs = list(builtin)
        if not docs:
            raise ValueError("no IDF documents: pass a data dir with CounterFact files or built-in texts")
        return docs
    root, seen, docs = Path(data_dir), set(), []
    found = [root / f for f in COUNTERFACT_FILES if (root / f).is_file()]
    if not found:
        raise FileNotFoundError(f"{root}: none of {', '.join(COUNTERFACT_FILES)} found for the TF-IDF statistics; "
                                "pass the data dir that holds counterfact/")
    for path in found:
        for rec in json.loads(path.read_text(encoding="utf-8")):
            if rec.get("case_id") in seen:
                continue
            seen.add(rec.get("case_id"))
            docs.append(_record_texts(rec))
    return docs


# ---------------------------------------------------------------------------------------------------- generation

@torch.no_grad()
def sample_texts(model, tok, prompts: Sequence[str], *, max_out_len: int = 100, top_k: int = 5, seed: int = 0,
                 prefix: str = "", batch_size: int = 16) -> list[str]:
    """ROME's ``generate_fast``: top-k sampling until each sequence (prompt included) has ``max_out_len`` tokens or
    EOS; returns prompt + continuation (without ``prefix``), NFKD-normalised with blank lines as spaces. Seeded with
    a forked RNG: the same prompts, batch size and seed give the same texts."""
    device = next(model.parameters()).device
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    encoded = [tok(prefix + p).input_ids for p in prompts]
    for p, ids in zip(prompts, encoded):
        check_context(max(len(ids) + 1, max_out_len), model, f"generation prompt {p[:60]!r}")
    texts: list[str] = [""] * len(prompts)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for idx in token_budget_batches([len(e) for e in encoded], 1 << 30, max_batch=batch_size):
            ids, mask = pad_batch([encoded[i] for i in idx], pad_id, side="left", device=device)
            shortest = min(len(encoded[i]) for i in idx)
            config = GenerationConfig(max_new_tokens=max(1, max_out_len - shortest), do_sample=True, top_k=top_k,
                                      top_p=1.0, temperature=1.0, num_beams=1, use_cache=True,
                                      eos_token_id=tok.eos_token_id, pad_token_id=pad_id)
            seqs = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
            for r, i in enumerate(idx):
                budget = max(1, max_out_len - len(encoded[i]))          # each row: max_out_len with its prompt
                new = seqs[r, ids.shape[1]:ids.shape[1] + budget].tolist()
                if tok.eos_token_id in new:
                    new = new[:new.index(tok.eos_token_id)]
                text = prompts[i] + tok.decode(new, skip_special_tokens=True)   # the prompt, not the prefix
                texts[i] = unicodedata.normalize("NFKD", text).replace("\n\n", " ")
    return texts


def generation_prefixes(case) -> list[str]:
    """The prompts to generate from: ``generation_prompts``, else the edit prompt and its paraphrases."""
    return list(case.generation_prompts) or [case.rewrite_prompt, *case.paraphrase_prompts]


def generation_metrics(model, tok, case, *, vectorizer=None, prefixes: Sequence[str] | None = None,
                       max_out_len: int = 100, top_k: int = 5, seed: int = 0, prefix: str = ""
                       ) -> tuple[dict[str, float | None], list[str]]:
    """``fluency`` and ``consistency`` (None without a vectorizer or attribute prompts) of one case, and the texts.
    ``prefixes`` replaces the case's generation prompts (e.g. unrelated prompts, to see collapse elsewhere)."""
    prompts = list(prefixes) if prefixes is not None else generation_prefixes(case)
    texts = sample_texts(model, tok, prompts, max_out_len=max_out_len, top_k=top_k, seed=seed, prefix=prefix)
    refs = reference_texts(case)
    consistency = (tfidf_similarity(" ".join(texts), " ".join(refs), vectorizer)
                   if vectorizer is not None and refs else None)
    return {"fluency": fluency(texts), "consistency": consistency}, texts
