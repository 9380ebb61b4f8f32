"""Run a real ``flashserve serve`` process for tests and benchmarks.

    with ServerProcess(["--max-model-len", "1024"]) as server:
        client = openai.OpenAI(base_url=server.url("/v1"), api_key="x")

Picks a free port on 127.0.0.1, waits for /health, and on exit terminates the process (SIGTERM,
then SIGKILL after a timeout), remembering its exit code and the children it had.
``HeadlessChromium`` drives a real browser (Debian's chromium) for the chat page test.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

import httpx


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux /proc), empty elsewhere."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            children += [int(x) for x in task.read_text().split()]
        except OSError:
            pass
    return children


def pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class ServerProcess:
    """A ``flashserve serve`` subprocess on a free port."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None, startup_timeout: float = 120.0) -> None:
        self.port = free_port()
        self.args = [sys.executable, "-m", "flashserve.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port), *args]
        self.env = {**os.environ, **(env or {})}
        self.startup_timeout = startup_timeout
        self.log = tempfile.NamedTemporaryFile(prefix="flashserve-server-", suffix=".log", delete=False)
        self.proc: subprocess.Popen[bytes] | None = None
        self.children: list[int] = []
        self.returncode: int | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str = "") -> str:
        return self.base_url + path

    def read_log(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def start(self) -> ServerProcess:
        self.proc = subprocess.Popen(self.args, stdout=self.log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} during startup:\n{self.read_log()[-4000:]}")
            try:
                if httpx.get(self.url("/health"), timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server did not become healthy in {self.startup_timeout}s:\n{self.read_log()[-4000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Signal the server and wait for it; SIGKILL if it overstays. Returns the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.children = child_pids(self.proc.pid)
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.returncode = self.proc.returncode
        self.log.close()
        return self.returncode

    def orphans(self) -> list[int]:
        """Children the server had when it was stopped that are still alive."""
        return [pid for pid in self.children if pid_alive(pid)]

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


class HeadlessChromium:
    """A headless Chromium driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``):
    JSON messages separated by NUL bytes on file descriptors 3 (to the browser) and 4 (from it),
    so neither a driver binary nor a websocket library is needed.

        with HeadlessChromium() as browser:
            browser.navigate("http://127.0.0.1:8000/")
            browser.evaluate("document.title")
    """

    FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
             "--remote-debugging-pipe")

    def __init__(self, binary: str | None = None, width: int = 1000, height: int = 640, timeout: float = 60.0) -> None:
        import shutil

        self.binary = binary or shutil.which("chromium") or shutil.which("chromium-browser")
        if self.binary is None:
            raise FileNotFoundError("no chromium binary on PATH (Debian: apt-get install chromium)")
        self.size = (width, height)
        self.timeout = timeout
        self.profile = tempfile.TemporaryDirectory(prefix="flashserve-chromium-")
        self.proc: subprocess.Popen[bytes] | None = None
        self.session: str | None = None
        self._next_id = 0
        self._buffer = b""
        self.events: list[dict] = []

    def start(self) -> HeadlessChromium:
        import fcntl

        to_browser_r, to_browser_w = os.pipe()
        from_browser_r, from_browser_w = os.pipe()
        # Park the child's ends above 10 so placing them on 3 and 4 cannot clobber each other.
        child_in = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD, 10)
        child_out = fcntl.fcntl(from_browser_w, fcntl.F_DUPFD, 10)
        os.close(to_browser_r)
        os.close(from_browser_w)

        def place_fds() -> None:
            os.dup2(child_in, 3)
            os.dup2(child_out, 4)

        self.proc = subprocess.Popen(
            [self.binary, *self.FLAGS, f"--user-data-dir={self.profile.name}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            pass_fds=(3, 4), preexec_fn=place_fds, start_new_session=True)
        os.close(child_in)
        os.close(child_out)
        self._write = os.fdopen(to_browser_w, "wb", buffering=0)
        self._read_fd = from_browser_r
        target = self.send("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True}, session=False)["sessionId"]
        self.send("Page.enable")
        self.send("Runtime.enable")
        width, height = self.size
        self.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1,
                                                         "mobile": False})
        return self

    def _read_message(self, deadline: float) -> dict:
        import json
        import select

        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._read_fd], [], [], left)[0]:
                raise TimeoutError("no answer from chromium")
            chunk = os.read(self._read_fd, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed its DevTools pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, params: dict | None = None, session: bool = True) -> dict:
        """Send one command and wait for its result (events that arrive meanwhile are kept)."""
        import json

        self._next_id += 1
        message: dict = {"id": self._next_id, "method": method, "params": params or {}}
        if session and self.session is not None:
            message["sessionId"] = self.session
        self._write.write(json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def navigate(self, url: str) -> None:
        self.events.clear()
        self.send("Page.navigate", {"url": url})
        self.wait_for("document.readyState === 'complete'")

    def evaluate(self, expression: str) -> object:
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float | None = None, poll: float = 0.1) -> object:
        """Poll a JavaScript expression until it is truthy; returns its value."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"still false after {timeout or self.timeout}s: {expression}")
            time.sleep(poll)

    def type_text(self, text: str) -> None:
        """Insert text at the focused element, as typing does (input events included)."""
        self.send("Input.insertText", {"text": text})

    def screenshot(self, path: str | Path) -> None:
        import base64

        data = self.send("Page.captureScreenshot", {"format": "png"})["data"]
        Path(path).write_bytes(base64.b64decode(data))

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self._write.close()
            except OSError:
                pass
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)  # the browser and its helpers: a session of our own
                self.proc.wait(10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        if self.proc is not None:
            os.close(self._read_fd)
            self.proc = None
        self.profile.cleanup()

    def __enter__(self) -> HeadlessChromium:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
