"""Minimal headless Chromium driver over the Chrome DevTools Protocol (stdlib only).

The browser is started with ``--remote-debugging-pipe``: it reads NUL-terminated
JSON commands on its fd 3 and writes NUL-terminated JSON responses and events on
its fd 4. One page target is attached in flat mode and every page-level command
is sent with its ``sessionId``.

Example::

    exe = find_chromium()
    with Browser(exe) as browser:
        browser.goto("file:///tmp/page.html")
        browser.click(120, 80)
        print(browser.evaluate("window.lastClick"))
        browser.screenshot("/tmp/page.png")

Run ``python tests/browser.py`` for a self-test (it skips when no Chromium is found).
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

#: Executable names tried, in order, by :func:`find_chromium`.
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")


def find_chromium() -> str | None:
    """Locate a Chromium-like browser.

    Returns:
        The ``CHROMIUM`` environment variable if it is set, else the first of
        :data:`CHROMIUM_NAMES` found on ``PATH``, else ``None``.
    """
    env = os.environ.get("CHROMIUM")
    if env:
        return env
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def _map_fds(read_fd: int, write_fd: int) -> None:
    """In the child, place the command pipe on fd 3 and the response pipe on fd 4.

    Both are first duplicated above fd 10 so that neither ``dup2`` can clobber
    the other when the parent's descriptors already sit on 3 or 4.

    Args:
        read_fd: The end the browser reads commands from.
        write_fd: The end the browser writes responses to.
    """
    high_read = fcntl.fcntl(read_fd, fcntl.F_DUPFD, 10)
    high_write = fcntl.fcntl(write_fd, fcntl.F_DUPFD, 10)
    os.dup2(high_read, 3)  # os.dup2 makes the new descriptor inheritable
    os.dup2(high_write, 4)
    os.close(high_read)
    os.close(high_write)


class Browser:
    """A headless Chromium process driven over a DevTools pipe.

    The constructor launches the process. Use it as a context manager: entering
    attaches to the page, enables the ``Page`` and ``Runtime`` domains and sets
    the viewport; leaving closes the browser and removes its temporary profile.

    Attributes:
        timeout: Default seconds to wait for a response or an event.
        width: Viewport width in CSS pixels.
        height: Viewport height in CSS pixels.
        events: CDP events received and not yet consumed by :meth:`wait_event`.
        session_id: The flat-mode session of the attached page target.
    """

    def __init__(self, executable: str, width: int = 1280, height: int = 900, timeout: float = 30.0) -> None:
        """Launch the browser.

        Args:
            executable: Path or name of the Chromium executable.
            width: Window width in CSS pixels.
            height: Window height in CSS pixels.
            timeout: Default seconds to wait for a response or an event.
        """
        self.timeout = timeout
        self.width, self.height = width, height
        self.events: list[dict] = []
        self.session_id: str | None = None
        self._next_id = 0
        self._buffer = b""
        self._tmpdir = tempfile.mkdtemp(prefix="cdp-browser-")
        self._log_path = Path(self._tmpdir) / "chromium.log"
        cmd_read, self._cmd_write = os.pipe()  # we write commands, the browser reads fd 3
        self._res_read, res_write = os.pipe()  # the browser writes fd 4, we read responses
        args = [
            executable,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--remote-debugging-pipe",
            f"--user-data-dir={self._tmpdir}",
            "--no-first-run",
            "--no-default-browser-check",
            "--allow-file-access-from-files",
            f"--window-size={width},{height}",
            "about:blank",
        ]
        try:
            with open(self._log_path, "wb") as log:
                self._proc = subprocess.Popen(
                    args,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    pass_fds=(3, 4),  # kept open by close_fds, after preexec_fn maps them
                    preexec_fn=lambda: _map_fds(cmd_read, res_write),
                    start_new_session=True,
                )
        except BaseException:
            for fd in (cmd_read, res_write, self._cmd_write, self._res_read):
                os.close(fd)
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            raise
        os.close(cmd_read)  # only the child keeps its ends, so EOF means the browser is gone
        os.close(res_write)

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> Browser:
        """Attach to the page target and enable ``Page`` and ``Runtime``.

        Returns:
            This browser.
        """
        try:
            self.session_id = self._attach_page()
            self.send("Page.enable")
            self.send("Runtime.enable")
            self.set_viewport(self.width, self.height)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Close the browser (see :meth:`close`)."""
        self.close()

    def _attach_page(self) -> str:
        """Attach in flat mode to a page target, creating one if there is none.

        Returns:
            The session id of the attached target.
        """
        targets = self.send("Target.getTargets", session=False)["targetInfos"]
        pages = [t["targetId"] for t in targets if t.get("type") == "page"]
        if pages:
            target_id = pages[0]
        else:
            target_id = self.send("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
        result = self.send("Target.attachToTarget", {"targetId": target_id, "flatten": True}, session=False)
        return result["sessionId"]

    def close(self) -> None:
        """Ask the browser to close, then stop the process and free the pipes and profile."""
        if self._cmd_write < 0:
            return
        try:
            self._write({"id": self._new_id(), "method": "Browser.close"})
        except OSError:
            pass
        self._stop_process()
        for fd in (self._cmd_write, self._res_read):
            os.close(fd)
        self._cmd_write = self._res_read = -1
        shutil.rmtree(self._tmpdir, ignore_errors=True)

    def _stop_process(self) -> None:
        """Wait briefly for the browser to exit, then terminate and finally kill it."""
        try:
            self._proc.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            self._proc.terminate()
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()

    def log_tail(self, chars: int = 2000) -> str:
        """Return the end of the browser's stdout/stderr log (for error messages).

        Args:
            chars: How many trailing characters to return.
        """
        try:
            return self._log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    # ------------------------------------------------------------------ protocol

    def _new_id(self) -> int:
        """Return the next command id."""
        self._next_id += 1
        return self._next_id

    def _write(self, message: dict) -> None:
        """Write one NUL-terminated JSON message to the browser."""
        data = json.dumps(message).encode() + b"\0"
        while data:
            data = data[os.write(self._cmd_write, data) :]

    def _read_message(self, deadline: float) -> dict:
        """Read the next JSON message from the browser.

        Args:
            deadline: ``time.monotonic()`` value after which to give up.

        Raises:
            TimeoutError: If nothing complete arrives before the deadline.
            RuntimeError: If the browser closed its end of the pipe.
        """
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._res_read], [], [], left)[0]:
                raise TimeoutError("no message from the browser in time")
            chunk = os.read(self._res_read, 1 << 20)
            if not chunk:
                raise RuntimeError(f"browser closed the DevTools pipe; log tail:\n{self.log_tail()}")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def send(self, method: str, params: dict | None = None, session: bool = True) -> dict:
        """Send a CDP command and wait for its response.

        Events read meanwhile are kept in :attr:`events`.

        Args:
            method: CDP method, e.g. ``"Page.navigate"``.
            params: Its parameters.
            session: Send it to the attached page session (else to the browser).

        Returns:
            The ``result`` object of the response.

        Raises:
            RuntimeError: With the CDP error message if the command failed.
            TimeoutError: If no response arrives within :attr:`timeout`.
        """
        message: dict[str, Any] = {"id": self._new_id(), "method": method, "params": params or {}}
        if session and self.session_id:
            message["sessionId"] = self.session_id
        self._write(message)
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") != message["id"]:
                if "method" in reply:
                    self.events.append(reply)
                continue
            if "error" in reply:
                error = reply["error"]
                raise RuntimeError(f"{method}: {error.get('message')} {error.get('data', '')}".strip())
            return reply.get("result", {})

    def wait_event(self, method: str, timeout: float | None = None) -> dict:
        """Wait for (and consume) the first event named ``method``.

        Args:
            method: CDP event name, e.g. ``"Page.loadEventFired"``.
            timeout: Seconds to wait; :attr:`timeout` if ``None``.

        Returns:
            The event's ``params``.

        Raises:
            TimeoutError: If the event does not arrive in time.
        """
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            for i, event in enumerate(self.events):
                if event.get("method") == method:
                    return self.events.pop(i).get("params", {})
            message = self._read_message(deadline)
            if "method" in message:
                self.events.append(message)

    # ------------------------------------------------------------------ page helpers

    def set_viewport(self, width: int, height: int) -> None:
        """Make the page viewport exactly ``width`` x ``height`` CSS pixels at scale 1.

        Headless ``--window-size`` sizes the window, whose viewport can be
        smaller (e.g. 800x457 for an 800x600 window with Chromium 156), so the
        size is also set by ``Emulation.setDeviceMetricsOverride``.
        """
        params = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}
        self.send("Emulation.setDeviceMetricsOverride", params)
        self.width, self.height = width, height

    def goto(self, url: str) -> None:
        """Navigate the page to ``url`` and wait for its load event.

        Raises:
            RuntimeError: If navigation fails (``errorText`` of ``Page.navigate``).
        """
        self.events = [e for e in self.events if e.get("method") != "Page.loadEventFired"]
        result = self.send("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise RuntimeError(f"navigation to {url} failed: {result['errorText']}")
        self.wait_event("Page.loadEventFired")

    def evaluate(self, expression: str) -> Any:
        """Evaluate JavaScript in the page and return its (JSON-able) value.

        Promises are awaited.

        Raises:
            RuntimeError: With the JavaScript exception text if it threw.
        """
        params = {"expression": expression, "returnByValue": True, "awaitPromise": True}
        result = self.send("Runtime.evaluate", params)
        details = result.get("exceptionDetails")
        if details:
            exception = details.get("exception", {})
            raise RuntimeError(exception.get("description") or details.get("text", "JavaScript exception"))
        return result.get("result", {}).get("value")

    def click(self, x: float, y: float) -> None:
        """Click the left mouse button at CSS pixel ``(x, y)`` of the viewport."""
        base = {"x": x, "y": y}
        self.send("Input.dispatchMouseEvent", {"type": "mouseMoved", **base})
        press = {**base, "button": "left", "clickCount": 1}
        self.send("Input.dispatchMouseEvent", {"type": "mousePressed", "buttons": 1, **press})
        self.send("Input.dispatchMouseEvent", {"type": "mouseReleased", "buttons": 0, **press})

    def screenshot(self, path: str | os.PathLike) -> None:
        """Save a PNG screenshot of the viewport to ``path``."""
        data = self.send("Page.captureScreenshot", {"format": "png"})["data"]
        Path(path).write_bytes(base64.b64decode(data))

    def wait_for(self, expression: str, timeout: float | None = None) -> Any:
        """Poll ``expression`` until it is truthy.

        Args:
            expression: JavaScript expression.
            timeout: Seconds to wait; :attr:`timeout` if ``None``.

        Returns:
            The first truthy value.

        Raises:
            TimeoutError: If it stays falsy.
        """
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"still falsy after waiting: {expression}")
            time.sleep(0.05)


# ---------------------------------------------------------------------- self-test

_TEST_PAGE = """<!doctype html>
<html><body style="margin:0;background:#eee">
<canvas id="c" width="400" height="300"
        style="position:absolute;left:100px;top:50px;background:#fff;border:0"></canvas>
<script>
const canvas = document.getElementById("c");
const ctx = canvas.getContext("2d");
ctx.strokeRect(0.5, 0.5, 399, 299);
canvas.addEventListener("click", (event) => {
  window.lastClick = [event.offsetX, event.offsetY];
  ctx.fillStyle = "red";
  ctx.beginPath();
  ctx.arc(event.offsetX, event.offsetY, 20, 0, 2 * Math.PI);
  ctx.fill();
});
</script></body></html>
"""


def _self_test(screenshot: str = "/tmp/browser_check.png") -> int:
    """Click a canvas at a known place and check the offset it saw.

    Returns:
        A process exit status: 0 on success or skip, 1 on failure.
    """
    executable = find_chromium()
    if executable is None:
        print("SKIP: no Chromium found (set CHROMIUM or install chromium)")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / "canvas.html"
        page.write_text(_TEST_PAGE)
        start = time.monotonic()
        with Browser(executable, width=800, height=600) as browser:
            launched = time.monotonic()
            browser.goto(page.as_uri())
            loaded = time.monotonic()
            browser.click(100 + 123, 50 + 45)
            last = browser.wait_for("window.lastClick", timeout=5)
            clicked = time.monotonic()
            viewport = browser.evaluate("[innerWidth, innerHeight]")
            browser.screenshot(screenshot)
    print(f"launch {launched - start:.2f}s, goto {loaded - launched:.2f}s, click {clicked - loaded:.2f}s")
    print(f"viewport {viewport}, lastClick {last}, screenshot {screenshot}")
    if last != [123, 45] or viewport != [800, 600]:
        print("FAIL: expected lastClick [123, 45] and viewport [800, 600]")
        return 1
    print("OK")
    return 0


if __name__ == "__main__":
    raise SystemExit(_self_test())
