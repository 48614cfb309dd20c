"""Progress of the long steps of a run (de-quantizing a model, sampling text, key statistics, the first perplexity
pass), shown on the terminal even while pytest captures a test's output.

A :class:`Progress` is handed to the code that does the work (``LayerStats``, the sampler, the model loader); the
code opens a step and reports units done::

    with progress.step("key statistics L5", total=30_720, unit="tok") as bar:
        bar.update(n)

On a terminal a step is a tqdm bar (rate and ETA) that stays as the step's summary line; elsewhere (``-q``, CI, a
pipe) it is one line when the step starts and one when it ends. Where the text goes is the ``stream``: the pytest
plugin passes one that suspends pytest's capture for each write (as pytest's own live logging does), library callers
get stderr. ``Progress.silent()`` reports nothing (tests, xdist workers)."""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import IO, Iterator


class _Bar:
    """What a step hands its caller: ``update(n)`` units done."""

    def __init__(self, tqdm_bar=None, heartbeat=None):
        self._bar = tqdm_bar
        self._heartbeat = heartbeat              # called after each update when there is no bar (a line now and then)
        self.n = 0

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self._heartbeat is not None:
            self._heartbeat(self.n)


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 60 else f"{int(seconds // 60)} min {seconds % 60:.0f} s"


class Progress:
    """Reports long steps on ``stream``. ``bars``: tqdm bars (a terminal) or start and end lines (None: a bar when
    ``stream`` is a terminal). ``enabled=False``: nothing at all."""

    def __init__(self, stream: IO[str] | None = None, bars: bool | None = None, enabled: bool = True):
        self.stream = stream
        self.enabled = enabled
        self._bars = bars

    @classmethod
    def silent(cls) -> "Progress":
        return cls(enabled=False)

    def _out(self) -> IO[str]:
        return self.stream if self.stream is not None else sys.stderr

    @property
    def bars(self) -> bool:
        if self._bars is None:
            isatty = getattr(self._out(), "isatty", None)
            self._bars = bool(isatty and isatty())
        return self._bars

    def line(self, text: str) -> None:
        """One line of news (a step's start or end, or a cache that was rebuilt)."""
        if self.enabled:
            out = self._out()
            out.write(f"harness: {text}\n")
            out.flush()

    @contextmanager
    def step(self, desc: str, total: int | None = None, unit: str = "it", note: str = "", initial: int = 0,
             every_s: float | None = None) -> Iterator[_Bar]:
        """A long step: a bar with rate and ETA (on a terminal, when ``total`` is known), else a start line
        (``desc``, ``note``) and an end line with the time taken and the rate; with ``every_s`` also a line with
        units done, rate and ETA at most that often (a step of hours under CI). ``initial``: units already done
        (a resumed stream), not counted in the rate."""
        if not self.enabled:
            yield _Bar()
            return
        t0 = time.perf_counter()
        if self.bars and total:                  # no total, no rate or ETA to show: the start and end lines
            from tqdm.auto import tqdm
            with tqdm(total=total, initial=initial, desc=f"harness: {desc}", unit=unit, unit_scale=True,
                      file=self._out(), mininterval=1.0, dynamic_ncols=True, leave=True) as t:
                yield _Bar(t)
            return
        size = f" ({total:,} {unit})" if total else ""
        extra = ", ".join(x for x in (note, f"{initial:,} done before" if initial else "") if x)
        self.line(f"{desc}{size}{': ' + extra if extra else ''} ...")
        last = [t0]

        def heartbeat(n: int) -> None:
            now = time.perf_counter()
            if now - last[0] >= every_s:
                last[0] = now
                rate = n / (now - t0)
                eta = f", about {_duration((total - initial - n) / rate)} left" if total and rate > 0 else ""
                self.line(f"{desc}: {initial + n:,}{f'/{total:,}' if total else ''} {unit} "
                          f"({rate * 60:,.1f} {unit}/min{eta})")

        bar = _Bar(heartbeat=heartbeat if every_s else None)
        yield bar
        dt = time.perf_counter() - t0
        per_s = bar.n / dt if bar.n and dt > 0 else 0.0
        rate = "" if not per_s else f", {per_s:,.0f} {unit}/s" if per_s >= 10 else f", {per_s * 60:,.1f} {unit}/min"
        self.line(f"{desc}: done in {_duration(dt)}{rate}")


class TerminalStream:
    """A text stream to pytest's terminal that pytest's capture does not swallow: each write suspends the global and
    fixture capture (``CaptureManager.global_and_fixture_disabled``, as pytest's live logging does) and goes through
    the terminal reporter, starting a new line when pytest was in the middle of one (its dots). The plugins are
    looked up at the first write (the terminal reporter registers after other plugins' ``pytest_configure``);
    without a terminal reporter (``-p no:terminal``) the text goes nowhere."""

    def __init__(self, config):
        self._config = config

    def _plugins(self):
        pm = self._config.pluginmanager
        return pm.getplugin("capturemanager"), pm.getplugin("terminalreporter")

    def write(self, text: str) -> int:
        from contextlib import nullcontext
        capman, tr = self._plugins()
        if tr is None:
            return len(text)
        with capman.global_and_fixture_disabled() if capman is not None else nullcontext():
            tr.ensure_newline()
            writer = getattr(tr, "_tw", None)          # under -q pytest's dots leave no file name to reset
            if text and text[0] not in "\r\n" and getattr(writer, "width_of_current_line", 0):
                tr.write("\n")
            tr.write(text, flush=True)
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        tr = self._plugins()[1]
        return bool(tr is not None and tr.isatty())
