"""Sequential editing: N edits one after another on the same model, no restore in between (the setting in which
almost every method collapses within few edits; Yang et al., 2024; Gupta et al., 2024; Huang et al., 2024).

After each edit: the edit's own scores ("immediate"), the edited layers' norms (the D4S paper's decline tracker)
and, on a schedule, perplexity (the collapse surrogate). After the last edit every earlier edit is re-scored
("final"). Each finished edit is appended to a JSONL journal at once, and the edited weights and the editor's state
are saved beside it, so a run killed mid-way resumes where it stopped with the same records.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from statistics import fmean
from typing import Any, Callable, Sequence

import torch

from .data.case import EditCase
from .editors.base import Editor
from .metrics import counterfact_metrics
from .models.loading import LoadedModel
from .models.snapshot import WeightSnapshot


def schedule_points(n_steps: int, spec: str = "every") -> list[int]:
    """Edit counts after which perplexity is measured: ``every`` (1..n), ``every:K`` (K, 2K, ..), ``geometric``
    (1, 2, 4, 8, ..); the last step is always included."""
    if spec == "every":
        pts = list(range(1, n_steps + 1))
    elif spec.startswith("every:"):
        k = int(spec.split(":", 1)[1])
        if k < 1:
            raise ValueError(f"--ppl-schedule {spec}: K must be >= 1")
        pts = list(range(k, n_steps + 1, k))
    elif spec == "geometric":
        pts, p = [], 1
        while p <= n_steps:
            pts.append(p)
            p *= 2
    else:
        raise ValueError(f"--ppl-schedule {spec!r}: use every, every:K or geometric")
    return sorted(set(pts) | {n_steps}) if n_steps else []


def layer_norms(snapshot: WeightSnapshot, model: torch.nn.Module) -> dict[str, dict[str, float]]:
    """Per edited weight: mean |W| (L1 / numel), mean |W - W_0| and ||W - W_0||_F."""
    params = dict(model.named_parameters())
    out = {}
    for name, delta in snapshot.deltas().items():
        w = params[name].detach()
        out[name] = {"l1": w.abs().mean().item(), "delta_l1": delta.abs().mean().item(),
                     "delta_fro": delta.float().norm().item()}
    return out


@dataclass
class SequentialResult:
    steps: list[dict[str, Any]] = field(default_factory=list)   # one per edit (batch), as journaled
    ppl_base: float = float("nan")
    final: dict[str, dict[str, Any]] = field(default_factory=dict)  # case_id -> scores after the last edit
    resumed_from: int = 0

    def ppl_curve(self) -> list[list[float]]:
        return [[0, self.ppl_base]] + [[s["n_edits"], s["ppl"]] for s in self.steps if s.get("ppl") is not None]

    def edits_to_collapse(self, ratio: float) -> int | None:
        for n, ppl in self.ppl_curve()[1:]:
            if not math.isfinite(ppl) or ppl / self.ppl_base >= ratio:
                return int(n)
        return None

    def metrics(self, collapse_ratio: float) -> dict[str, Any]:
        def mean_of(values) -> float | None:
            values = [v for v in values if v is not None]
            return fmean(values) if values else None

        norm_series = {}
        for s in self.steps:
            for name, v in s["norms"].items():
                norm_series.setdefault(name, []).append([s["n_edits"], v["l1"]])
        first = next(iter(norm_series.values()), [])
        curve = self.ppl_curve()
        fin = self.final.values()
        out = {
            "n_edits": self.steps[-1]["n_edits"] if self.steps else 0,
            "edits_to_collapse": self.edits_to_collapse(collapse_ratio),
            "ppl_curve": curve, "ppl_before": self.ppl_base, "ppl_after": curve[-1][1],
            "ppl_ratio": curve[-1][1] / self.ppl_base,
            "efficacy_immediate": mean_of(v for s in self.steps for v in s["efficacy"]),
            "efficacy_final": mean_of(f.get("efficacy_success") for f in fin),
            "paraphrase_final": mean_of(f.get("paraphrase_success") for f in fin),
            "neighborhood_final": mean_of(f.get("neighborhood_success") for f in fin),
            "rewrite_acc_final": mean_of(f.get("rewrite_acc") for f in fin),
            "norm_l1": first,                      # mean |W| of the (first) edited weight after each edit
            "norm_l1_by_param": norm_series,
            "delta_fro": [[s["n_edits"], sum(v["delta_fro"] for v in s["norms"].values())] for s in self.steps],
        }
        if any("wild_efficacy" in s for s in self.steps):      # WILD (--wild): the generated answer
            out["wild_efficacy_immediate"] = mean_of(v for s in self.steps for v in s.get("wild_efficacy", []))
            out["wild_efficacy_final"] = mean_of(f.get("wild_rewrite_contains") for f in fin)
            out["wild_em_final"] = mean_of(f.get("wild_rewrite_em") for f in fin)
        return out


class SequentialRun:
    """Owner of one sequential run: its journal, its checkpoint and the model's original weights."""

    def __init__(self, lm: LoadedModel, editor: Editor, cases: Sequence[EditCase], *,
                 perplexity: Callable[[], float], ppl_base: float, journal_dir: Path, batch_size: int = 1,
                 ppl_schedule: str = "every", resume: bool = False, progress: bool = False, wild: bool = False):
        if batch_size > 1 and not editor.supports_batch:
            raise ValueError(f"editor {editor.name!r} edits one case at a time; use --batch-size 1")
        self.lm, self.editor, self.cases = lm, editor, list(cases)
        self.perplexity, self.ppl_base = perplexity, ppl_base
        self.batch_size, self.resume, self.progress, self.wild = batch_size, resume, progress, wild
        self.batches = [self.cases[i:i + batch_size] for i in range(0, len(self.cases), batch_size)]
        self.ppl_points = set(schedule_points(len(self.cases), ppl_schedule))
        key = hashlib.sha1(json.dumps([editor.name, lm.identity.get("fingerprint"), [c.case_id for c in cases],
                                       batch_size, ppl_schedule, editor.describe()["hparams"]],
                                      default=str).encode()).hexdigest()[:12]
        self.journal = Path(journal_dir) / f"{editor.name}-{key}.jsonl"
        self.checkpoint = self.journal.with_suffix(".pt")

    # --- journal ---------------------------------------------------------------------------------------
    def _load_journal(self) -> list[dict]:
        if not (self.resume and self.journal.exists() and self.checkpoint.exists()):
            return []
        steps = [json.loads(line) for line in self.journal.read_text().splitlines() if line.strip()]
        ck = torch.load(self.checkpoint, weights_only=True, map_location="cpu")
        done = ck["n_batches"]
        steps = steps[:done]               # a line written after the last checkpoint is replayed
        params = dict(self.lm.model.named_parameters())
        with torch.no_grad():
            for name, w in ck["weights"].items():
                params[name].copy_(w.to(params[name].device))
        self.editor.load_state(ck.get("editor_state") or {})
        return steps

    def _save(self, steps: list[dict], names: list[str]) -> None:
        params = dict(self.lm.model.named_parameters())
        tmp = self.checkpoint.with_suffix(".tmp")
        torch.save({"n_batches": len(steps), "weights": {n: params[n].detach().cpu() for n in names},
                    "editor_state": self.editor.state()}, tmp)
        tmp.replace(self.checkpoint)

    # --- the run ---------------------------------------------------------------------------------------
    def run(self, timer) -> SequentialResult:
        lm, editor = self.lm, self.editor
        self.journal.parent.mkdir(parents=True, exist_ok=True)
        names = editor.edited_parameters(lm)
        original = WeightSnapshot(lm.model, names)  # taken before any replay: restore returns to the base model
        editor.prepare(lm)                          # from the unedited model, as in an uninterrupted run
        result = SequentialResult(ppl_base=self.ppl_base)
        try:
            steps = self._load_journal()
            result.resumed_from = len(steps)
            if not steps:
                self.journal.write_text("")
            n_edits = sum(len(s["case_ids"]) for s in steps)
            from tqdm.auto import tqdm
            bar = tqdm(total=len(self.batches), initial=len(steps), desc=f"sequential {editor.name}",
                       disable=not self.progress, leave=False)
            for batch in self.batches[len(steps):]:
                with timer.phase("edit"):
                    edit = editor.apply(lm, batch)
                n_edits += len(batch)
                with timer.phase("evaluate"):
                    scores = [counterfact_metrics(lm.model, lm.tokenizer, c, prefix=edit.prompt_prefix)
                              for c in batch]
                ppl = None
                if any(n_edits - len(batch) < p <= n_edits for p in self.ppl_points):   # a point in this batch
                    with timer.phase("perplexity"):
                        ppl = self.perplexity()
                step = {"n_edits": n_edits, "case_ids": [c.case_id for c in batch], "ppl": ppl,
                        "efficacy": [s.get("efficacy_success") for s in scores],
                        "paraphrase": [s.get("paraphrase_success") for s in scores],
                        "norms": layer_norms(original, lm.model), "edit_seconds": edit.seconds}
                if self.wild:
                    with timer.phase("wild"):
                        step["wild_efficacy"] = [w.contains for w in _wild_rewrite(lm, batch, edit.prompt_prefix)]
                steps.append(step)
                with self.journal.open("a") as f:    # the record first, then the weights it describes
                    f.write(json.dumps(step) + "\n")
                self._save(steps, names)
                bar.update(1)
            bar.close()
            result.steps = steps
            with timer.phase("evaluate_final"):
                for c in self.cases:
                    m = counterfact_metrics(lm.model, lm.tokenizer, c)
                    result.final[c.case_id] = {k: m.get(k) for k in ("efficacy_success", "paraphrase_success",
                                                                     "neighborhood_success", "rewrite_acc")}
                if self.wild:
                    for c, w in zip(self.cases, _wild_rewrite(lm, self.cases, "")):
                        result.final[c.case_id].update(wild_rewrite_contains=float(w.contains),
                                                       wild_rewrite_em=float(w.exact))
        finally:
            with timer.phase("restore"):
                original.restore()
                editor.reset()
        return result


def _wild_rewrite(lm: LoadedModel, cases: Sequence[EditCase], prefix: str) -> list:
    """WILD scores (greedy generation, natural stop) of each case's edit prompt against its new target."""
    from .metrics.wild import wild_scores
    return wild_scores(lm.model, lm.tokenizer, [c.rewrite_prompt for c in cases], [c.target_new for c in cases],
                       prefix=prefix)
