"""Phase timings and peak memory for one record: CUDA events (synchronised) on a GPU, wall clock on CPU."""
from __future__ import annotations

import contextlib
import resource
import sys
import time

import torch


class PhaseTimer:
    """``with timer.phase("edit"): ...`` adds the phase's seconds to ``timer.seconds["edit"]``."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.cuda = torch.device(device).type == "cuda" and torch.cuda.is_available()
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
            t0 = time.perf_counter()
            try:
                yield
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def memory(self) -> dict[str, float]:
        """Peak GPU memory allocated during this record, or the process's peak resident set size so far."""
        if self.cuda:
            return {"peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20}
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return {"peak_rss_mb": rss / (2**20 if sys.platform == "darwin" else 2**10)}
