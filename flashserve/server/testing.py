"""Run a real ``flashserve serve`` process for tests and benchmarks.

    with ServerProcess(["--max-model-len", "1024"]) as server:
        client = openai.OpenAI(base_url=server.url("/v1"), api_key="x")

Picks a free port on 127.0.0.1, waits for /health, and on exit terminates the process (SIGTERM,
then SIGKILL after a timeout), remembering its exit code and the children it had.
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
