"""Sequential editing (collapse papers; D4S): the cases as one stream of edits without restore in between,
journaled and resumable (``harness.sequential.SequentialRun``); the model is restored after the stream and the
restore checked by digest."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..editing import guarded
from ..metrics.perplexity import PREFIXED, PROTOCOLS as PPL
from ..metrics.wild import PROTOCOL as WILD_PROTOCOL
from ..sequential import SequentialRun
from .base import Measurement

if TYPE_CHECKING:
    from ..data.case import EditCase
    from ..editors.base import Editor
    from ..session import HarnessSession
    from ..timing import PhaseTimer

PROTOCOLS = {"ppl_curve": PPL["ppl"], "efficacy_immediate": "rome-counterfact, right after each edit",
             "efficacy_final": "rome-counterfact, every edit re-scored after the last one",
             "rewrite_acc_final": "easyedit-teacher-forced, every edit re-scored after the last one",
             "norm_l1": "mean |W| of the edited weight after each edit (D4S)",
             "norm_growth": "sum |W| over the edited weights after the last edit / before the first (D4S)",
             "wild_efficacy_immediate": f"{WILD_PROTOCOL}: contains target_new, right after each edit",
             "wild_efficacy_final": f"{WILD_PROTOCOL}: contains target_new, every edit re-scored after the last one",
             "wild_em_final": f"{WILD_PROTOCOL}: exact match, every edit re-scored after the last one",
             "probe_tf_efficacy": "rome-counterfact efficacy (P(new) > P(true) after the edit prompt) of --probe-size "
                                  "past edits drawn every --probe-every edits",
             "probe_tf_acc": "easyedit-teacher-forced token accuracy of target_new, the same sampled past edits",
             "probe_wild_efficacy": f"{WILD_PROTOCOL}: contains target_new, the same sampled past edits",
             "probe_wild_em": f"{WILD_PROTOCOL}: exact match, the same sampled past edits"}

# For the metric registry (``MetricSpec`` keyword arguments): the WILD additions of this protocol.
METRIC_SPECS = tuple(dict(name=k, protocol=PROTOCOLS[k], higher_is_better=True, unit="fraction", label=label,
                          description=PROTOCOLS[k].split(": ", 1)[1])
                     for k, label in (("wild_efficacy_immediate", "WILD ES immediate"),
                                      ("wild_efficacy_final", "WILD ES final"), ("wild_em_final", "WILD EM final"))
                     ) + (dict(name="rewrite_acc_final", protocol=PROTOCOLS["rewrite_acc_final"],
                               higher_is_better=True, unit="fraction", label="TF acc final",
                               description="teacher-forced token accuracy of every edit after the last"),)


def sequential(session: HarnessSession, editor: Editor, cases: Sequence[EditCase], timer: PhaseTimer
               ) -> Measurement:
    """Perplexity curve, edits to collapse (``--collapse-ratio``), immediate and final efficacy (with ``--wild``
    also WILD efficacy), norm growth."""
    o, lm = session.options, session.lm
    run = SequentialRun(lm, editor, cases,
                        perplexity=lambda: session.perplexity(prefix=run.prompt_prefix).mean_ppl,
                        ppl_base=session.base_perplexity().mean_ppl,
                        journal_dir=Path(o.report_dir) / "sequential", batch_size=o.batch_size,
                        ppl_schedule=o.ppl_schedule, resume=o.resume, progress=session.progress, wild=o.wild,
                        ppl_texts=session.ppl_texts(), probe_every=o.probe_every, probe_size=o.probe_size)
    with guarded(lm, editor, f"the sequential run of {editor.name}"):
        result = run.run(timer)
    metrics = result.metrics(session.thresholds.collapse_ppl_ratio)
    info = {"resumed_from": result.resumed_from, "resumed_edits": result.resumed_edits, "batch_size": o.batch_size,
            "ppl_schedule": o.ppl_schedule,
            # the stream's own cases (the run's provenance records --cases' cases): how many, which, their content
            "stream_cases": {"n": len(cases), "first": cases[0].case_id if cases else None,
                             "last": cases[-1].case_id if cases else None,
                             "content_sha256": run.key_parts.get("cases")},   # digested once, for the resume key
            **({"probe_every": o.probe_every, "probe_size": o.probe_size} if o.probe_every else {})}
    protocols = dict(PROTOCOLS)
    if run.prompt_prefix:            # an in-context editor: every score and perplexity after its growing prefix
        protocols["ppl_curve"] += f", after each edit: {PREFIXED}"
        for k in protocols:          # every score of the edits (ES, teacher-forced accuracy, WILD) was read after it
            if k.endswith(("_immediate", "_final")) or k.startswith("probe_"):
                protocols[k] += ", after the editor's prompt prefix"
    return Measurement(metrics, protocols, info)
