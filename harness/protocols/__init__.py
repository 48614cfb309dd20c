"""What each suite measures, one function per suite: ``(session, editor, case(s), timer) -> Measurement``.

A protocol applies edits through :func:`harness.editing.edited` (the model is restored and checked after), reads
the session's state (model, statistics, references measured once) and returns the metrics, the protocol text of
each metric, and information about the edit. It asserts nothing: verdicts are ``harness.thresholds``'."""
from .base import Measurement
from .diversity import diversity, diversity_summary
from .downstream import correlation, downstream_edit
from .localization import causal_trace, editing_problem, layer_sweep, problem_unsupported, sweep_unsupported
from .locality import locality
from .sequential import sequential
from .single import counterfact, single_edit
from .wild import wild

__all__ = ["Measurement", "causal_trace", "correlation", "counterfact", "diversity", "diversity_summary",
           "downstream_edit", "editing_problem", "layer_sweep", "locality", "problem_unsupported", "sequential",
           "single_edit", "sweep_unsupported", "wild"]
