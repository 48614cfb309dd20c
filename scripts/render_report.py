"""Render an HTML report in headless Chromium and save a PNG screenshot, failing on console errors.

    python scripts/render_report.py reports/latest.html -o docs/report.png [--width 1280] [--max-height 6000]

The page is loaded from disk with no network at all: host names do not resolve (``--host-resolver-rules``) and
every request that is not ``file:``, ``data:``, ``blob:`` or ``about:`` is failed before it leaves the browser
(DevTools ``Fetch`` domain) and counted as an error. Errors are: ``console.error``/``console.assert``, uncaught
exceptions, browser log entries of level error (failed resource loads, CSP violations, ...), blocked requests and
a failed navigation. Warnings are printed with ``--verbose`` but do not fail.

No Python dependency beyond the standard library: the script speaks the Chrome DevTools protocol over
``--remote-debugging-pipe`` (file descriptors 3 and 4, NUL-separated JSON). The browser is Debian's ``chromium``
(``apt-get install -y chromium``); ``$CHROMIUM`` names another binary.

Exit status: 0 rendered cleanly; 1 the page logged errors (one line on stderr lists them); 2 no browser, no such
file, or the browser failed (one line on stderr).
"""
from __future__ import annotations

import argparse
import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
LOCAL_SCHEMES = ("file:", "data:", "blob:", "about:")

# The flags asked for (headless, no GPU, no QUIC, nothing in the background, a fresh profile), plus everything
# else that could make the browser itself reach out: no DNS for any host, no pings, no safe-browsing or
# translation or optimisation-guide fetches, no crash reports.
BASE_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--host-resolver-rules=MAP * ~NOTFOUND", "--no-pings", "--disable-domain-reliability",
    "--disable-client-side-phishing-detection", "--disable-default-apps", "--disable-extensions",
    "--disable-breakpad", "--no-default-browser-check", "--disable-dev-shm-usage", "--hide-scrollbars",
    "--mute-audio", "--disable-features=Translate,OptimizationHints,MediaRouter,DialMediaRouteProvider,"
    "AutofillServerCommunication,CertificateTransparencyComponentUpdater",
)


class RenderError(Exception):
    """The page could not be rendered (no browser, no file, the browser failed); the message is one line."""


@dataclass
class RenderResult:
    png: Path | None
    width: int = 0
    height: int = 0
    errors: list[str] = field(default_factory=list)      # console errors, exceptions, blocked requests, ...
    warnings: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)     # URLs of requests that would have used the network
    dom: str = ""                                         # document.documentElement.outerHTML after load
    probe: Any = None                                     # the value of the ``probe`` expression, if one was given

    @property
    def ok(self) -> bool:
        return not self.errors


def find_chromium(explicit: str | None = None) -> str | None:
    """The browser binary: ``explicit``, ``$CHROMIUM``, the first of CANDIDATES on PATH, or None."""
    named = explicit or os.environ.get("CHROMIUM")
    if named:   # a browser named on purpose is the only one tried
        return shutil.which(named) or (named if os.path.isfile(named) and os.access(named, os.X_OK) else None)
    for name in CANDIDATES:
        if path := shutil.which(name):
            return path
    return None


def _require_chromium(chromium: str | None) -> str:
    exe = find_chromium(chromium)
    if exe is None:
        named = chromium or os.environ.get("CHROMIUM")
        where = f"{named!r} is not an executable" if named else f"none of {', '.join(CANDIDATES)} is on PATH"
        raise RenderError(f"chromium not found ({where}): install it (apt-get install -y chromium) "
                          "or set CHROMIUM=/path/to/it")
    return exe


def _file_url(path: str | Path) -> tuple[Path, str]:
    p = Path(path).resolve()
    if not p.is_file():
        raise RenderError(f"{path}: no such file")
    return p, p.as_uri()


# --------------------------------------------------------------------------- DevTools over a pipe


class _Browser:
    """One headless Chromium with a fresh profile, driven over ``--remote-debugging-pipe``."""

    def __init__(self, exe: str, timeout: float):
        self.timeout = timeout
        self.profile = tempfile.TemporaryDirectory(prefix="render-report-")
        self.log_path = Path(self.profile.name) / "chromium.log"
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        # move the child's ends out of the way of 3 and 4 before dup2 puts them there in the child
        child_in = fcntl.fcntl(to_child_r, fcntl.F_DUPFD_CLOEXEC, 10)
        child_out = fcntl.fcntl(from_child_w, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(to_child_r), os.close(from_child_w)

        def wire_fds() -> None:  # runs in the child between fork and exec; dup2'd fds are inheritable
            os.dup2(child_in, 3)
            os.dup2(child_out, 4)

        args = [exe, *BASE_FLAGS, f"--user-data-dir={self.profile.name}", "--remote-debugging-pipe", "about:blank"]
        with open(self.log_path, "wb") as log:
            try:
                self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                             close_fds=False, preexec_fn=wire_fds)
            except OSError as e:
                raise RenderError(f"could not start {exe}: {e}") from None
            finally:
                os.close(child_in), os.close(child_out)
        self.w, self.r = to_child_w, from_child_r
        self.buf = b""
        self.next_id = 0
        self.responses: dict[int, dict] = {}
        self.events: list[dict] = []

    # -- transport
    def send(self, method: str, params: dict | None = None, session: str | None = None) -> int:
        self.next_id += 1
        msg: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        data = json.dumps(msg).encode() + b"\0"
        try:
            while data:
                data = data[os.write(self.w, data):]
        except BrokenPipeError:
            raise RenderError(f"the browser exited ({self._log_tail()})") from None
        return self.next_id

    def _read(self, deadline: float) -> bool:
        """Read what is there (waiting until deadline); queue complete messages. False on timeout."""
        wait = deadline - time.monotonic()
        if wait <= 0 or not select.select([self.r], [], [], wait)[0]:
            return False
        chunk = os.read(self.r, 1 << 20)
        if not chunk:
            raise RenderError(f"the browser closed the DevTools pipe ({self._log_tail()})")
        self.buf += chunk
        *messages, self.buf = self.buf.split(b"\0")
        for raw in messages:
            msg = json.loads(raw)
            if "id" in msg:
                self.responses[msg["id"]] = msg
            else:
                self.events.append(msg)
        return True

    def call(self, method: str, params: dict | None = None, session: str | None = None,
             on_event=None) -> dict:
        mid = self.send(method, params, session)
        deadline = time.monotonic() + self.timeout
        while mid not in self.responses:
            if on_event:
                self.drain(on_event)
            if not self._read(deadline):
                raise RenderError(f"the browser did not answer {method} within {self.timeout:.0f} s")
        if on_event:
            self.drain(on_event)
        msg = self.responses.pop(mid)
        if "error" in msg:
            raise RenderError(f"{method} failed: {msg['error'].get('message')}")
        return msg.get("result", {})

    def drain(self, on_event) -> None:
        while self.events:
            on_event(self.events.pop(0))

    def pump_until(self, done, on_event, timeout: float) -> bool:
        """Handle events until done() or timeout; returns done()."""
        deadline = time.monotonic() + timeout
        while True:
            self.drain(on_event)
            if done():
                return True
            if not self._read(deadline):
                self.drain(on_event)
                return done()

    def _log_tail(self) -> str:
        try:
            lines = [ln for ln in self.log_path.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            lines = []
        return lines[-1][:200] if lines else "no output"

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                try:
                    self.send("Browser.close")
                except RenderError:
                    pass
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=10)
        finally:
            for fd in (self.w, self.r):
                try:
                    os.close(fd)
                except OSError:
                    pass
            self.profile.cleanup()


def _remote_object_text(obj: dict) -> str:
    if "value" in obj:
        return obj["value"] if isinstance(obj["value"], str) else json.dumps(obj["value"])
    return obj.get("description") or obj.get("unserializableValue") or obj.get("type", "?")


# --------------------------------------------------------------------------- public API


def render(html: str | Path, png: str | Path | None, *, width: int = 1280, height: int = 900,
           full_page: bool = True, max_height: int = 6000, chromium: str | None = None,
           timeout: float = 60.0, settle: float = 0.3, probe: str | None = None) -> RenderResult:
    """Load ``html`` from disk with no network, collect errors and the DOM, and save a PNG of the page (the
    whole page up to ``max_height`` CSS pixels with ``full_page``, else the ``width`` x ``height`` viewport).
    ``png=None`` takes no screenshot. ``probe``, a JavaScript expression, is evaluated in the loaded page (at the
    ``width`` x ``height`` viewport, before the screenshot) and its JSON value kept as ``result.probe``; a probe
    that throws is a RenderError. Raises RenderError when it cannot render at all."""
    path, url = _file_url(html)
    exe = _require_chromium(chromium)
    result = RenderResult(png=None)
    loaded = {"done": False}
    browser = _Browser(exe, timeout)
    try:
        target = browser.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]

        def on_event(ev: dict) -> None:
            method, p = ev.get("method"), ev.get("params", {})
            if ev.get("sessionId") not in (None, session):
                return
            if method == "Fetch.requestPaused":
                req_url = p["request"]["url"]
                if req_url.startswith(LOCAL_SCHEMES):
                    browser.send("Fetch.continueRequest", {"requestId": p["requestId"]}, session)
                else:
                    result.blocked.append(req_url)
                    result.errors.append(f"network request blocked: {req_url}")
                    browser.send("Fetch.failRequest", {"requestId": p["requestId"], "errorReason": "BlockedByClient"},
                                 session)
            elif method == "Runtime.consoleAPICalled":
                text = " ".join(_remote_object_text(a) for a in p.get("args", []))
                if p.get("type") in ("error", "assert"):
                    result.errors.append(f"console.{p['type']}: {text}")
                elif p.get("type") == "warning":
                    result.warnings.append(f"console.warn: {text}")
            elif method == "Runtime.exceptionThrown":
                d = p.get("exceptionDetails", {})
                text = (d.get("exception") or {}).get("description") or d.get("text", "exception")
                result.errors.append(f"uncaught: {text.splitlines()[0]}")
            elif method == "Log.entryAdded":
                e = p.get("entry", {})
                text = f"{e.get('source', 'log')}: {e.get('text', '')}" + (f" ({e['url']})" if e.get("url") else "")
                if e.get("level") == "error":
                    result.errors.append(text)
                elif e.get("level") == "warning":
                    result.warnings.append(text)
            elif method == "Page.loadEventFired":
                loaded["done"] = True

        for method, params in (("Fetch.enable", {"patterns": [{"urlPattern": "*"}]}), ("Page.enable", {}),
                               ("Runtime.enable", {}), ("Log.enable", {}), ("Network.enable", {}),
                               ("Emulation.setDeviceMetricsOverride",
                                {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})):
            browser.call(method, params, session, on_event)
        nav = browser.call("Page.navigate", {"url": url}, session, on_event)
        if nav.get("errorText"):
            result.errors.append(f"navigation failed: {nav['errorText']}")
        elif not browser.pump_until(lambda: loaded["done"], on_event, timeout):
            raise RenderError(f"{html}: the page did not finish loading within {timeout:.0f} s")
        browser.pump_until(lambda: False, on_event, settle)   # late errors (fonts, lazy images)

        dom = browser.call("Runtime.evaluate", {"expression": "document.documentElement.outerHTML",
                                                "returnByValue": True}, session, on_event)
        result.dom = dom.get("result", {}).get("value", "")
        if probe is not None:
            got = browser.call("Runtime.evaluate", {"expression": probe, "returnByValue": True}, session, on_event)
            if got.get("exceptionDetails"):
                d = got["exceptionDetails"]
                text = (d.get("exception") or {}).get("description") or d.get("text", "exception")
                raise RenderError(f"the probe failed: {text.splitlines()[0]}")
            result.probe = got.get("result", {}).get("value")
        if png is not None:
            metrics = browser.call("Page.getLayoutMetrics", {}, session, on_event)
            size = metrics.get("cssContentSize") or metrics.get("contentSize") or {}
            shot_h = min(int(size.get("height", height)), max_height) if full_page else height
            shot = browser.call("Page.captureScreenshot", {
                "format": "png", "captureBeyondViewport": full_page,
                "clip": {"x": 0, "y": 0, "width": width, "height": max(shot_h, 1), "scale": 1}}, session, on_event)
            out = Path(png)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(base64.b64decode(shot["data"]))
            result.png, result.width, result.height = out, width, max(shot_h, 1)
        browser.pump_until(lambda: False, on_event, 0.05)
    finally:
        browser.close()
    return result


def dump_dom(html: str | Path, *, chromium: str | None = None, timeout: float = 60.0) -> str:
    """The DOM after load as ``chromium --headless --dump-dom`` prints it (same flags, fresh profile)."""
    _, url = _file_url(html)
    exe = _require_chromium(chromium)
    with tempfile.TemporaryDirectory(prefix="render-report-") as profile:
        try:
            proc = subprocess.run([exe, *BASE_FLAGS, f"--user-data-dir={profile}", "--dump-dom", url],
                                  stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RenderError(f"chromium --dump-dom did not finish within {timeout:.0f} s") from None
    if proc.returncode != 0 or not proc.stdout.strip():
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
        raise RenderError(f"chromium --dump-dom failed (exit {proc.returncode}): {tail}")
    return proc.stdout


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="exit status: 0 clean, 1 errors on the page, 2 could not render")
    ap.add_argument("html", help="the HTML file (e.g. reports/latest.html)")
    ap.add_argument("-o", "--output", help="PNG to write (default: the HTML path with .png)")
    ap.add_argument("--width", type=int, default=1280, help="viewport width in CSS pixels (default 1280)")
    ap.add_argument("--height", type=int, default=900, help="viewport height (default 900)")
    ap.add_argument("--viewport-only", action="store_true", help="capture the viewport, not the whole page")
    ap.add_argument("--max-height", type=int, default=6000, help="cap on a full-page capture (default 6000)")
    ap.add_argument("--dom", help="also write the DOM after load to this file")
    ap.add_argument("--chromium", help="browser binary (default: $CHROMIUM, then chromium on PATH)")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds for the browser (default 60)")
    ap.add_argument("-v", "--verbose", action="store_true", help="print warnings too")
    a = ap.parse_args(argv)
    out = Path(a.output) if a.output else Path(a.html).with_suffix(".png")
    try:
        res = render(a.html, out, width=a.width, height=a.height, full_page=not a.viewport_only,
                     max_height=a.max_height, chromium=a.chromium, timeout=a.timeout)
    except RenderError as e:
        print(f"render_report: {e}", file=sys.stderr)
        return 2
    if a.dom:
        Path(a.dom).write_text(res.dom, encoding="utf-8")
    if a.verbose:
        for w in res.warnings:
            print(f"warning: {w}", file=sys.stderr)
    if res.errors:
        shown = "; ".join(e.replace("\n", " ") for e in res.errors[:5])
        more = f" (+{len(res.errors) - 5} more)" if len(res.errors) > 5 else ""
        print(f"render_report: {len(res.errors)} error(s) loading {a.html}: {shown}{more}", file=sys.stderr)
        return 1
    print(f"wrote {out} ({res.width}x{res.height}, {out.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
