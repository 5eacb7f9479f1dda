"""Helpers shared by the serve tests: settings for a quick server, waiting, and servers run for real.

Two ways to run the real app: :class:`ServerProcess` is ``python -m cinematic serve`` in a child process (what a
user runs; it can be ``kill -9``-ed), and :func:`serve_in_thread` runs uvicorn in this process on a free loopback
port (for the fuzz test, which needs a URL but no process boundary).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx

from cinematic.serve.settings import Limits, Settings

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent


def quick_settings(data: Path, **changes: Any) -> Settings:
    """One CPU worker on one thread (the test machine has two cores and may be busy), the bundled model."""
    limits = changes.pop("limits", Limits())
    return Settings(model="shapes", data=data, devices=("cpu",), threads=1, limits=limits, **changes)


@contextlib.contextmanager
def running(data: Path, **changes: Any) -> Iterator[Any]:
    """The real app with its workers, in this process, behind Starlette's TestClient (a ``quick_settings`` server)."""
    from fastapi.testclient import TestClient

    from cinematic.serve.app import create_app
    from cinematic.serve.service import configure_process

    settings = quick_settings(data, **changes)
    configure_process(settings)  # as `cinematic serve` does; conftest restores the thread count for the next test
    with TestClient(create_app(settings)) as client:
        yield client


def submit(client: Any, **body: Any) -> dict:
    """``POST /v1/videos`` that must be accepted; the job as returned."""
    response = client.post("/v1/videos", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def wait_for(check: Callable[[], T | None], timeout: float = 60.0, every: float = 0.05, what: str = "") -> T:
    """Call ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or check}")
        time.sleep(every)


def wait_status(client: httpx.Client, video_id: str, statuses: tuple[str, ...], timeout: float = 60.0) -> dict:
    def check() -> dict | None:
        job = client.get(f"/v1/videos/{video_id}").json()
        return job if job["status"] in statuses else None

    return wait_for(check, timeout, what=f"{video_id} to be {'/'.join(statuses)}")


class LoggedProcess:
    """A ``cinematic`` child process (``process``) whose output goes to an open log file (``_log_file``)."""

    process: subprocess.Popen
    _log_file: Any

    def kill(self) -> None:
        """``kill -9``: no shutdown code runs, as in a power cut of the process."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)
        self._log_file.close()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(30)
        self._log_file.close()


class ServerProcess(LoggedProcess):
    """``cinematic serve --port 0`` in a child process; its log (stdout and stderr) goes to ``log``."""

    def __init__(self, data: Path, log: Path, *args: str, threads: int | None = 1, env: dict[str, str] | None = None):
        self.log = log
        command = [sys.executable, "-m", "cinematic", "serve", "--port", "0", "--data", str(data)]
        if threads is not None:
            command += ["--threads", str(threads)]
        child_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        if threads is not None:
            child_env["OMP_NUM_THREADS"] = str(threads)
        self._log_file = open(log, "a")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [*command, *args], stdout=self._log_file, stderr=subprocess.STDOUT, env=child_env, cwd=ROOT
        )
        self.url = wait_for(self._url, timeout=120, every=0.1, what=f"the server to listen (log: {log})")
        wait_for(self._healthy, timeout=120, every=0.1, what="/healthz")

    def _url(self) -> str | None:
        if self.process.poll() is not None:
            raise AssertionError(f"the server exited with {self.process.returncode}:\n{self.log.read_text()}")
        match = re.search(r"cinematic serve: (http://\S+?)/ ", self.log.read_text())
        return match.group(1) if match else None

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/healthz", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, **kwargs)


@contextlib.contextmanager
def serve_in_thread(app: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free loopback port in a thread; yields the base URL."""
    import uvicorn

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, timeout=60, what="uvicorn to start")
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(120)
        listener.close()
