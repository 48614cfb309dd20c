"""Phase timings and peak memory for one record: CUDA events (synchronised) on a GPU, wall clock on CPU."""
from __future__ import annotations

import contextlib
import resource
import sys
import time

import torch


def peak_rss_mb() -> float:
    """The process's peak resident set size so far, in MB."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


class PhaseTimer:
    """``with timer.phase("edit"): ...`` adds the phase's seconds to ``timer.seconds["edit"]``. On CPU the clock is
    the wall clock, or ``clock`` (e.g. ``time.process_time`` for CPU seconds, as the speed benchmark counts)."""

    def __init__(self, device: torch.device | str = "cpu", clock=time.perf_counter):
        self.cuda = torch.device(device).type == "cuda" and torch.cuda.is_available()
        self.clock = clock
        self.seconds: dict[str, float] = {}
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    @contextlib.contextmanager
    def phase(self, name: str):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            try:
                yield
            finally:
                end.record()
                torch.cuda.synchronize()
                self.seconds[name] = self.seconds.get(name, 0.0) + start.elapsed_time(end) / 1000.0
        else:
            t0 = self.clock()
            try:
                yield
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + self.clock() - t0

    def memory(self) -> dict[str, float]:
        """Peak GPU memory allocated during this record, or the process's peak resident set size so far."""
        if self.cuda:
            return {"peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20}
        return {"peak_rss_mb": peak_rss_mb()}
