"""Sequential editing: N edits one after another on the same model, no restore in between (the setting in which
almost every method collapses within few edits; Yang et al., 2024; Gupta et al., 2024; Huang et al., 2024).

After each edit: the edit's own scores ("immediate"), the edited layers' norms (the D4S paper's decline tracker)
and, on a schedule, perplexity (the collapse surrogate). After the last edit every earlier edit is re-scored
("final"). Each finished edit is appended to a JSONL journal at once, and the edited weights and the editor's state
are saved beside it, so a run killed mid-way resumes where it stopped with the same records.

What a resume trusts: the checkpoint is written atomically (temporary file, fsync, rename) and carries its own
journal lines, the run's key and a SHA-256 of all of that, so it is either whole and self-consistent or is
refused. The journal is checked against it line by line: lines written after the last checkpoint (a crash between
the append and the save) are dropped and their edits replayed, lines the checkpoint has but the journal lost are
written back, and any other difference is a one-line refusal. One run at a time writes a journal (an exclusive
lock beside it); the weights are restored at the end and checked by digest.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import socket
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from statistics import fmean
from typing import Any, Callable, Sequence

import torch

from .data.case import EditCase
from .data.resolved import cases_digest, cases_resolved, content_digest as _digest, key_parts, stats_resolved, texts_digest, texts_resolved  # noqa: F401,E501
from .editors.base import Editor
from .metrics import counterfact_metrics
from .metrics.norms import l1_norm, norm_growth, total_l1, weight_norms
from .metrics.registry import aggregate
from .models.loading import LoadedModel
from .models.snapshot import WeightSnapshot, param_digest
from .progress import Progress

CHECKPOINT_FORMAT = 3     # 3: the run key's parts are stored (a refused resume names what differs)

# The parts of a run's key, as a refused resume names them: a checkpoint is resumed only when all of them are equal.
KEY_PART_NAMES = {"editor": "editor", "model": "model (fingerprint)", "case_ids": "case ids",
                  "cases": "the cases' content (the dataset file changed?)", "batch_size": "--batch-size",
                  "ppl_schedule": "--ppl-schedule", "hparams": "the editor's hyper-parameters", "wild": "--wild",
                  "ppl_texts": "the perplexity texts (--ppl-texts / --ppl-corpus)",
                  "stats": "the key-statistics corpus or tokens (--stats-corpus / --stats-tokens)",
                  "probe": "--probe-every / --probe-size"}


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
    resumed_from: int = 0             # journal steps (editor calls) made before this process, replayed
    l1_before: float = float("nan")   # sum |W| over the edited weights, unedited model (D4S's L1 norm)
    l1_after: float = float("nan")    # the same after the last edit

    @property
    def resumed_edits(self) -> int:
        """The edits in the ``resumed_from`` replayed steps (a step is one editor call: a batch)."""
        return sum(len(s["case_ids"]) for s in self.steps[:self.resumed_from])

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
            # a stream is one record: its final scores' intervals are over its edits (the registry's bootstrap)
            "final_ci": {k: [a.low, a.high] for k in ("efficacy", "paraphrase", "neighborhood")
                         for a in [aggregate([f.get(f"{k}_success") for f in fin])] if a.n},
            "l1_before": self.l1_before, "l1_after": self.l1_after,
            "norm_growth": norm_growth(self.l1_before, self.l1_after),
        }
        probes = [(s["n_edits"], s["probe"]) for s in self.steps if "probe" in s]
        if probes:                                             # the Mirage probe (--probe-every)
            for key, name in (("tf_efficacy", "probe_tf_efficacy"), ("tf_acc", "probe_tf_acc"),
                              ("wild_contains", "probe_wild_efficacy"), ("wild_em", "probe_wild_em")):
                out[name] = [[n, mean_of(p[key])] for n, p in probes]
        if any("wild_efficacy" in s for s in self.steps):      # WILD (--wild): the generated answer
            out["wild_efficacy_immediate"] = mean_of(v for s in self.steps for v in s.get("wild_efficacy", []))
            out["wild_efficacy_final"] = mean_of(f.get("wild_rewrite_contains") for f in fin)
            out["wild_em_final"] = mean_of(f.get("wild_rewrite_em") for f in fin)
        return out


class ResumeError(RuntimeError):
    """A journal or checkpoint that cannot be trusted; the message is one line naming the file and what to do."""


class ConcurrentRunError(RuntimeError):
    """Another live process is writing the same journal (the message names it and the way out)."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


class JournalLock:
    """Exclusive ownership of one journal for one process: an OS lock (``flock``) on ``<journal>.lock``, which
    holds the owner's pid and host for the refusal message. The kernel releases the lock when its owner dies (even
    by SIGKILL), so a crashed run never leaves a stale lock behind. The file itself is left in place: removing it
    would let two processes lock two different files of the same name."""

    def __init__(self, journal: Path):
        self.journal = journal
        self.path = journal.with_name(journal.name + ".lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            _lock_fd(fd)
        except OSError:
            owner = os.read(fd, 200).decode(errors="replace").strip() or "unknown process"
            os.close(fd)
            raise ConcurrentRunError(
                f"{self.journal}: another run ({owner}) is writing this journal; wait for it to finish, or give "
                "this run another --report-dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)          # closing the descriptor releases the lock
            self._fd = None


def _lock_fd(fd: int) -> None:
    """Non-blocking exclusive lock on ``fd``; OSError when another descriptor holds it."""
    try:
        import fcntl
    except ImportError:                 # Windows
        import msvcrt
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        return
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _content_digest(obj: Any) -> str:
    """SHA-256 of a checkpoint's content (nested dicts, lists, tensors, plain values), independent of how torch lays
    out the file: torch.load checks no checksum, so a flipped byte in a tensor would otherwise load silently."""
    h = hashlib.sha256()

    def feed(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            h.update(f"T{x.dtype}{tuple(x.shape)}".encode())
            h.update(x.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if x.numel() else b"")
        elif isinstance(x, dict):
            h.update(f"D{len(x)}".encode())
            for k in sorted(x, key=repr):
                feed(k)
                feed(x[k])
        elif isinstance(x, (list, tuple)):
            h.update(f"L{len(x)}".encode())
            for v in x:
                feed(v)
        else:
            h.update(f"{type(x).__name__}:{x!r};".encode())
    feed(obj)
    return h.hexdigest()


def run_key_parts(lm: LoadedModel, editor: Editor, cases: Sequence[EditCase], *, batch_size: int,
                  ppl_schedule: str, wild: bool, ppl_texts: Sequence[str] | None,
                  probe: tuple[int, int] | None = None) -> dict[str, Any]:
    """Everything that makes two sequential runs' records comparable (``KEY_PART_NAMES``). The perplexity texts,
    the key statistics and the cases' content enter as the records the session keeps for provenance
    (``harness.data.resolved``), turned into key parts by one function (``key_parts``)."""
    stats = getattr(editor, "stats", None)
    records = {"perplexity": None if ppl_texts is None else texts_resolved(None, None, ppl_texts),
               "statistics": None if stats is None else stats_resolved(stats, files=False),
               "dataset": cases_resolved(None, None, cases)}
    return {"editor": editor.name, "model": lm.identity.get("fingerprint"),
            "case_ids": [c.case_id for c in cases], "batch_size": batch_size,
            "ppl_schedule": ppl_schedule, "hparams": editor.describe()["hparams"], "wild": bool(wild),
            **({"probe": list(probe)} if probe else {}), **key_parts(records)}


def _key_difference(saved: Any, now: dict[str, Any]) -> str:
    """The refusal of a checkpoint written with other settings, naming the settings that differ."""
    if isinstance(saved, dict):
        names = [KEY_PART_NAMES.get(k, k) for k in KEY_PART_NAMES.keys() | now.keys() | saved.keys()
                 if _digest(saved.get(k)) != _digest(now.get(k))]
        what = ", ".join(sorted(names)) or "the run key"
    else:
        what = "unknown settings"
    return (f"checkpoint of a run with other settings ({what} differ); to resume it, rerun with its original "
            "settings")


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a unique temporary file, fsync'd, then renamed over it."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


class SequentialRun:
    """Owner of one sequential run: its journal, its checkpoint and the model's original weights."""

    def __init__(self, lm: LoadedModel, editor: Editor, cases: Sequence[EditCase], *,
                 perplexity: Callable[[], float], ppl_base: float, journal_dir: Path, batch_size: int = 1,
                 ppl_schedule: str = "every", resume: bool = False, progress: Progress | bool = False,
                 wild: bool = False,
                 ppl_texts: Sequence[str] | None = None, probe_every: int = 0, probe_size: int = 20):
        if batch_size > 1 and not editor.supports_batch:
            raise ValueError(f"editor {editor.name!r} edits one case at a time; use --batch-size 1")
        self.lm, self.editor, self.cases = lm, editor, list(cases)
        self.perplexity, self.ppl_base = perplexity, ppl_base
        self.batch_size, self.resume, self.progress, self.wild = batch_size, resume, progress, wild
        self.batches = [self.cases[i:i + batch_size] for i in range(0, len(self.cases), batch_size)]
        self.ppl_points = set(schedule_points(len(self.cases), ppl_schedule))
        # the Mirage probe: every K edits, S past edits drawn at random, teacher-forced and WILD efficacy side by side
        self.probe_size = probe_size
        self.probe_points = set(schedule_points(len(self.cases), f"every:{probe_every}")) if probe_every else set()
        # everything that makes two runs' records comparable: a journal is only ever resumed by the same run
        self.key_parts = run_key_parts(lm, editor, self.cases, batch_size=batch_size, ppl_schedule=ppl_schedule,
                                       wild=wild, ppl_texts=ppl_texts,
                                       probe=(probe_every, probe_size) if probe_every else None)
        self.key = _digest(self.key_parts)
        # the journal is named by the stream (editor, model, case ids), not by the whole key: a resume with other
        # settings finds the earlier run's checkpoint and is refused naming what differs, instead of starting afresh
        stream = _digest([editor.name, lm.identity.get("fingerprint"), [c.case_id for c in self.cases]])
        self.journal = Path(journal_dir) / f"{editor.name}-{stream[:12]}.jsonl"
        self.checkpoint = self.journal.with_suffix(".pt")
        self.lock = JournalLock(self.journal)
        # an in-context editor's prefix after the latest edit (IKE): every score and perplexity of the stream reads
        # the model through it; the ``perplexity`` callback may read it here
        self.prompt_prefix = ""

    # --- checkpoint: the saved state, whole or refused -----------------------------------------------------
    def _refuse(self, path: Path, problem: str) -> ResumeError:
        other = self.checkpoint if path == self.journal else self.journal
        return ResumeError(f"{path}: {problem}; delete it and {other.name} beside it to start over, or rerun "
                           "without --resume")

    def _read_checkpoint(self, names: list[str]) -> dict | None:
        """The checkpoint, verified (format, run key, weights digest, parameter names); None when there is none."""
        if not self.checkpoint.exists():
            return None
        try:
            with warnings.catch_warnings():    # torch's own remarks on a garbled pickle: the refusal says it
                warnings.simplefilter("ignore")
                ck = torch.load(self.checkpoint, weights_only=True, map_location="cpu")
        except Exception as e:  # any unpickling / zip / IO failure: the file is damaged
            raise self._refuse(self.checkpoint, f"damaged checkpoint ({_first_line(e)[:120]})") from None
        try:
            problem = self._checkpoint_problem(ck, names)
        except (TypeError, AttributeError, ValueError, RuntimeError) as e:   # fields of the wrong type
            problem = f"damaged checkpoint ({_first_line(e)[:120]})"
        if problem:
            raise self._refuse(self.checkpoint, problem)
        return ck

    def _checkpoint_problem(self, ck: Any, names: list[str]) -> str | None:
        if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
            return "checkpoint of another format (an older harness version?)"
        if ck.get("run_key") != self.key:
            return _key_difference(ck.get("run_key_parts"), self.key_parts)
        weights = ck.get("weights")
        if not isinstance(weights, dict) or sorted(weights) != sorted(names):
            return f"checkpoint holds other weights than {names}"
        if _content_digest({k: v for k, v in ck.items() if k != "sha256"}) != ck.get("sha256"):
            return "damaged checkpoint (its content does not match its SHA-256)"
        lines = ck.get("journal")
        if (not isinstance(lines, list) or not all(isinstance(x, str) for x in lines)
                or len(lines) != ck.get("n_batches") or len(lines) > len(self.batches)):
            return "damaged checkpoint (its journal lines do not match its count)"
        return None

    def _save(self, lines: list[str], names: list[str]) -> None:
        params = dict(self.lm.model.named_parameters())
        weights = {n: params[n].detach().cpu().clone() for n in names}
        tmp = self.checkpoint.with_name(f"{self.checkpoint.name}.{os.getpid()}.tmp")
        try:
            payload = {"format": CHECKPOINT_FORMAT, "run_key": self.key,
                       "run_key_parts": json.loads(json.dumps(self.key_parts, default=str)), "n_batches": len(lines),
                       "journal": list(lines), "weights": weights, "editor_state": self.editor.state()}
            torch.save({**payload, "sha256": _content_digest(payload)}, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            tmp.replace(self.checkpoint)
        finally:
            tmp.unlink(missing_ok=True)

    # --- journal: checked against the checkpoint -----------------------------------------------------------
    def _journal_lines(self) -> list[str]:
        """The journal's complete lines (a last line without its newline was cut short by a crash: dropped)."""
        if not self.journal.exists():
            return []
        try:
            text = self.journal.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise self._refuse(self.journal, f"damaged journal ({_first_line(e)[:120]})") from None
        return text.split("\n")[:-1]

    def _reconcile(self, ck: dict | None) -> list[str]:
        """The journal lines to resume from: the checkpoint's, once the journal agrees with them; the journal is
        rewritten to exactly those lines (extra lines dropped, lost lines written back)."""
        journal = self._journal_lines()
        saved: list[str] = list(ck["journal"]) if ck else []
        common = min(len(journal), len(saved))
        bad = next((i for i in range(common) if journal[i] != saved[i]), None)
        if bad is not None:
            raise self._refuse(self.journal, f"line {bad + 1} differs from the checkpoint's record of that edit "
                                             "(written by another run or edited by hand)")
        if len(journal) > len(saved):
            warnings.warn(f"{self.journal}: {len(journal) - len(saved)} edit(s) journaled after the last checkpoint "
                          "are replayed", stacklevel=3)
        elif len(journal) < len(saved):
            warnings.warn(f"{self.journal}: {len(saved) - len(journal)} journal line(s) lost; restored from "
                          f"{self.checkpoint.name}", stacklevel=3)
        for i, line in enumerate(saved):
            step = json.loads(line)
            if step.get("case_ids") != [c.case_id for c in self.batches[i]]:
                raise self._refuse(self.checkpoint, f"edit {i + 1} was of other cases than this run's")
        _write_atomic(self.journal, "".join(line + "\n" for line in saved).encode())
        return saved

    def _start(self, names: list[str]) -> list[str]:
        """Journal lines of the edits already done: those of a verified checkpoint with --resume, else none (and
        the files of an earlier run with the same configuration are cleared)."""
        if self.resume:
            ck = self._read_checkpoint(names)
            lines = self._reconcile(ck)
            if ck is not None:
                params = dict(self.lm.model.named_parameters())
                with torch.no_grad():
                    for name, w in ck["weights"].items():
                        params[name].copy_(w.to(params[name].device))
                self.editor.load_state(ck.get("editor_state") or {})
            return lines
        self.checkpoint.unlink(missing_ok=True)
        _write_atomic(self.journal, b"")
        return []

    def _append(self, line: str) -> None:
        with self.journal.open("a", encoding="utf-8") as f:    # the record first, then the weights it describes
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    # --- the run ---------------------------------------------------------------------------------------
    def run(self, timer) -> SequentialResult:
        lm, editor = self.lm, self.editor
        self.journal.parent.mkdir(parents=True, exist_ok=True)
        names = editor.edited_parameters(lm)
        self.lock.acquire()
        try:
            original = WeightSnapshot(lm.model, names)  # taken before any replay: restore returns to the base model
            before = param_digest(lm.model, names)
            try:
                editor.prepare(lm)                      # from the unedited model, as in an uninterrupted run
                return self._run(timer, names, original)
            finally:
                with timer.phase("restore"):
                    original.restore()
                    editor.reset()
                if param_digest(lm.model, names) != before:
                    raise RuntimeError(f"restore after the sequential {editor.name} run was not bit-exact for {names}")
        finally:
            self.lock.release()

    def _run(self, timer, names: list[str], original: WeightSnapshot) -> SequentialResult:
        lm = self.lm
        lines = self._start(names)
        result = SequentialResult(ppl_base=self.ppl_base, resumed_from=len(lines))
        steps = [json.loads(line) for line in lines]
        self.prompt_prefix = steps[-1].get("prompt_prefix", "") if steps else ""
        n_edits = sum(len(s["case_ids"]) for s in steps)
        progress = self.progress if isinstance(self.progress, Progress) else Progress(enabled=bool(self.progress))
        with progress.step(f"sequential {self.editor.name}", total=len(self.cases), unit="edits", initial=n_edits,
                           every_s=60.0) as bar:
            self._edit_all(timer, steps, lines, names, original, n_edits, bar)
        result.steps = steps
        result.l1_before = sum(l1_norm(w) for w in original.saved.values())
        result.l1_after = total_l1(weight_norms(lm.model, names))
        with timer.phase("evaluate_final"):
            for c in self.cases:
                m = counterfact_metrics(lm.model, lm.tokenizer, c, prefix=self.prompt_prefix)
                result.final[c.case_id] = {k: m.get(k) for k in ("efficacy_success", "paraphrase_success",
                                                                 "neighborhood_success", "rewrite_acc")}
            if self.wild:
                for c, w in zip(self.cases, _wild_rewrite(lm, self.cases, self.prompt_prefix)):
                    result.final[c.case_id].update(wild_rewrite_contains=float(w.contains),
                                                   wild_rewrite_em=float(w.exact))
        return result

    def _edit_all(self, timer, steps: list[dict], lines: list[str], names: list[str], original: WeightSnapshot,
                  n_edits: int, bar) -> None:
        """The stream's remaining batches, each edited, scored, journaled and checkpointed (``steps`` and
        ``lines`` grow with them)."""
        lm, editor = self.lm, self.editor
        for batch in self.batches[len(steps):]:
            with timer.phase("edit"):
                edit = editor.apply(lm, batch)
            n_edits += len(batch)
            self.prompt_prefix = edit.prompt_prefix
            with timer.phase("evaluate"):
                scores = [counterfact_metrics(lm.model, lm.tokenizer, c, prefix=edit.prompt_prefix) for c in batch]
            ppl = None
            if _in_batch(self.ppl_points, n_edits, len(batch)):
                with timer.phase("perplexity"):
                    ppl = self.perplexity()
            step = {"n_edits": n_edits, "case_ids": [c.case_id for c in batch], "ppl": ppl,
                    "efficacy": [s.get("efficacy_success") for s in scores],
                    "paraphrase": [s.get("paraphrase_success") for s in scores],
                    "norms": layer_norms(original, lm.model), "edit_seconds": edit.seconds}
            if self.wild:
                with timer.phase("wild"):
                    step["wild_efficacy"] = [w.contains for w in _wild_rewrite(lm, batch, edit.prompt_prefix)]
            if _in_batch(self.probe_points, n_edits, len(batch)):
                with timer.phase("probe"):
                    step["probe"] = self._probe(n_edits, edit.prompt_prefix)
            if edit.prompt_prefix:
                step["prompt_prefix"] = edit.prompt_prefix
            line = json.dumps(step)
            steps.append(json.loads(line))       # the record as a resumed run reads it back
            lines.append(line)
            self._append(line)
            self._save(lines, names)
            bar.update(len(batch))

    def _probe(self, n_edits: int, prefix: str) -> dict[str, Any]:
        """The Mirage probe (Yang et al., 2025, "The Mirage of Model Editing"): ``probe_size`` of the first
        ``n_edits`` edits, drawn without replacement by a generator seeded with ``n_edits`` (the same draw in every
        run and on resume), each scored two ways on the current model: teacher-forced (P(new) > P(true) after the
        edit prompt, and the new target's token accuracy given its own prefix) and in the wild (greedy generation
        to its natural stop: does it contain / equal the new target)."""
        import random
        from .metrics.scoring import score_targets
        idx = sorted(random.Random(n_edits).sample(range(n_edits), min(self.probe_size, n_edits)))
        sample = [self.cases[i] for i in idx]
        pairs = [(c.rewrite_prompt, t) for c in sample for t in (c.target_new, c.target_true) if t is not None]
        scores = iter(score_targets(self.lm.model, self.lm.tokenizer, [p for p, _ in pairs], [t for _, t in pairs],
                                    prefix=prefix))                     # one batched call for the whole sample
        tf, acc = [], []
        for c in sample:
            new = next(scores)
            tf.append(None if c.target_true is None else float(new.prob > next(scores).prob))
            acc.append(new.token_accuracy)
        wild = _wild_rewrite(self.lm, sample, prefix)
        return {"case_ids": [c.case_id for c in sample], "tf_efficacy": tf, "tf_acc": acc,
                "wild_contains": [float(w.contains) for w in wild], "wild_em": [float(w.exact) for w in wild]}


def _in_batch(points: set[int], n_edits: int, size: int) -> bool:
    """A scheduled edit count falls within the batch of ``size`` edits that brought the stream to ``n_edits``."""
    return any(n_edits - size < p <= n_edits for p in points)


def _wild_rewrite(lm: LoadedModel, cases: Sequence[EditCase], prefix: str) -> list:
    """WILD scores (greedy generation, natural stop) of each case's edit prompt against its new target."""
    from .metrics.wild import wild_scores
    return wild_scores(lm.model, lm.tokenizer, [c.rewrite_prompt for c in cases], [c.target_new for c in cases],
                       prefix=prefix)
