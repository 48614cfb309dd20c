"""The one edit-case type every loader produces and every editor and metric consumes."""
from __future__ import annotations

from dataclasses import dataclass, field, asdict
from typing import Any


OBJECTIVES = ("rewrite", "amplify", "erase", "force")


@dataclass(frozen=True)
class EditCase:
    """One requested edit: rewrite ``prompt.format(subject)`` from ``target_true`` to ``target_new``.

    ``prompt`` is a template holding ``{}`` where the subject goes (ROME's convention). Targets are stored
    without a leading space; tokenisation adds one. Every list may be empty when a format does not carry it.
    """

    case_id: str
    subject: str
    prompt: str                      # template with "{}" for the subject
    target_new: str
    target_true: str | None = None   # None when the format has no ground truth (e.g. some zsRE records)
    paraphrase_prompts: tuple[str, ...] = ()
    neighborhood_prompts: tuple[str, ...] = ()   # true answer for these is target_true (CounterFact)
    attribute_prompts: tuple[str, ...] = ()      # prompts whose answer is target_new (CounterFact)
    generation_prompts: tuple[str, ...] = ()
    # locality pairs whose answer is not target_true (EasyEdit locality, zsRE's NQ questions)
    locality: tuple[tuple[str, str], ...] = ()
    relation_id: str | None = None
    source: str = ""                 # "counterfact", "easyedit", "zsre", "hardedit", "builtin", ...
    # what the editor optimises for target_new (Hase et al. 2023's editing problems; harness/problems.py):
    # "rewrite" (default: raise P(target_new)), "amplify" (same loss, target_new = the true answer), "erase" (lower
    # P(target_new)), "force" (raise P(target_new) while the subject's embeddings carry Gaussian noise of std
    # ``noise_std``, seeded by ``noise_seed``)
    objective: str = "rewrite"
    noise_std: float = 0.0
    noise_seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def rewrite_prompt(self) -> str:
        """The edit prompt with the subject filled in."""
        return self.prompt.format(self.subject)

    def with_targets(self, target_new: str, target_true: str | None) -> "EditCase":
        """A copy with other targets (used by the editing-problem variants)."""
        d = asdict(self)
        d.update(target_new=target_new, target_true=target_true)
        return EditCase(**d)

    def with_objective(self, objective: str, noise_std: float = 0.0, noise_seed: int = 0) -> "EditCase":
        """A copy that asks the editor for another objective (see ``objective``)."""
        if objective not in OBJECTIVES:
            raise ValueError(f"case {self.case_id}: unknown objective {objective!r}; use one of {', '.join(OBJECTIVES)}")
        if objective == "force" and not noise_std > 0:
            raise ValueError(f"case {self.case_id}: objective 'force' needs noise_std > 0 (the subject-noise scale)")
        d = asdict(self)
        d.update(objective=objective, noise_std=float(noise_std), noise_seed=int(noise_seed))
        return EditCase(**d)
