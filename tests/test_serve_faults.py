"""The server survives its own faults (issue 23): a full disk, a store that refuses writes, a worker that dies or
hangs, a hostile body. Each fault is the real one where a test can make it without root (the OS refusing a rename
into the videos or uploads folder with ENOSPC, SQLite's own "database or disk is full" error at the store's write
methods, a BaseException in the worker's loop), and after each the worker goes on with the next job.
"""

from __future__ import annotations

import base64
import errno
import os
import re
import socket
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("fastapi", reason="the serve extra is not installed")

from cinematic.cli import main  # noqa: E402
from cinematic.errors import CinematicError  # noqa: E402
from cinematic.serve.app import create_app  # noqa: E402
from cinematic.serve.faults import Scrubber  # noqa: E402
from cinematic.serve.service import Service  # noqa: E402
from cinematic.serve.settings import JSON_ROOM, Limits, Settings, resolve  # noqa: E402
from tests.serve_helpers import quick_settings, running, serve_in_thread, submit, wait_for, wait_status  # noqa: E402

QUICK = {"prompt": "a red circle moving left", "steps": 2, "frames": 4}
FULL = sqlite3.OperationalError("database or disk is full")


def no_server_path(message: str, data: Path) -> None:
    assert str(data) not in message and str(data.resolve()) not in message, message
    assert not re.search(r"/\w+/", message), message


def healthz(client: Any) -> tuple[int, dict]:
    response = client.get("/healthz")
    return response.status_code, response.json()


@pytest.fixture
def disk_full(monkeypatch) -> Callable[[Path], threading.Event]:
    """``fill(folder)``: while the returned event is set, renaming a file into ``folder`` fails with ENOSPC, as on a
    full disk (every file the server writes is written beside its target and renamed)."""
    real = os.replace

    def fill(folder: Path) -> threading.Event:
        full = threading.Event()
        full.set()

        def replace(source: Any, target: Any, *args: Any, **kwargs: Any) -> None:
            if full.is_set() and Path(target).parent == folder:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))
            real(source, target, *args, **kwargs)

        monkeypatch.setattr(os, "replace", replace)
        return full

    return fill


def refuse(monkeypatch, store: Any, *methods: str, error: Exception = FULL) -> threading.Event:
    """While the returned event is set, the store's ``methods`` raise ``error`` (SQLite refusing the write)."""
    refusing = threading.Event()
    refusing.set()
    for name in methods:
        real = getattr(store, name)

        def method(*args: Any, _real: Callable = real, **kwargs: Any) -> Any:
            if refusing.is_set():
                raise error
            return _real(*args, **kwargs)

        monkeypatch.setattr(store, name, method)
    return refusing


class Hooked:
    """A worker's pipeline with ``hook(i)`` run at each step, before the worker's own callback."""

    def __init__(self, pipeline: Any, hook: Callable[[int], None]):
        self._pipeline, self._hook = pipeline, hook

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipeline, name)

    def __call__(self, *args: Any, callback: Callable[[int, int], None], **kwargs: Any) -> Any:
        def step(i: int, total: int) -> None:
            self._hook(i)
            callback(i, total)

        return self._pipeline(*args, callback=step, **kwargs)


# --- the worker goes on --------------------------------------------------------------------------------------


def test_a_full_disk_fails_the_job_and_the_worker_goes_on(tmp_path, disk_full):
    data = tmp_path / "data"
    with running(data) as client:
        full = disk_full(data / "videos")
        job = wait_status(client, submit(client, **QUICK)["id"], ("completed", "failed"))
        assert job["status"] == "failed"
        message = job["error"]["message"]
        assert message == "the server could not write the video: No space left on device"
        assert list((data / "videos").iterdir()) == [], "no file, not even a temporary one, is left"
        full.clear()
        after = wait_status(client, submit(client, **QUICK)["id"], ("completed", "failed"))
        assert after["status"] == "completed"
        assert healthz(client)[0] == 200


def test_when_the_error_handler_cannot_write_either(tmp_path, disk_full, monkeypatch):
    """The issue's case: the file cannot be written, and neither can the job's failure. The worker keeps the
    outcome, goes on, and records it when the store takes writes again."""
    data = tmp_path / "data"
    with running(data) as client:
        store = client.app.state.service.store
        file_full = disk_full(data / "videos")
        store_full = refuse(monkeypatch, store, "fail", "complete")
        first = submit(client, **QUICK)
        status, health = wait_for(
            lambda: (h := healthz(client))[1]["workers"][0]["unrecorded"] == 1 and h, what="the unrecorded outcome"
        )
        worker = health["workers"][0]
        assert status == 200 and worker["state"] in ("idle", "busy") and "database or disk is full" in worker["fault"]
        assert client.get(f"/v1/videos/{first['id']}").json()["status"] == "in_progress"

        file_full.clear()
        second = submit(client, **QUICK)  # made while the store still refuses: the worker does not wait
        wait_for(lambda: healthz(client)[1]["workers"][0]["unrecorded"] == 2, what="the second job to be made")
        store_full.clear()
        failed = wait_status(client, first["id"], ("completed", "failed"))
        assert failed["status"] == "failed" and "No space left on device" in failed["error"]["message"]
        assert wait_status(client, second["id"], ("completed", "failed"))["status"] == "completed"
        worker = wait_for(lambda: (w := healthz(client)[1]["workers"][0])["fault"] is None and w, what="recovery")
        assert worker["unrecorded"] == 0
        assert sorted(p.name for p in (data / "videos").iterdir()) == [f"{second['id']}.mp4"]
        third = wait_status(client, submit(client, **QUICK)["id"], ("completed", "failed"))
        assert third["status"] == "completed"
        assert 'cinematic_jobs{status="completed"} 2' in client.get("/metrics").text


def test_unrecorded_outcomes_run_again_after_a_restart(tmp_path, monkeypatch):
    data = tmp_path / "data"
    with running(data) as client:
        refuse(monkeypatch, client.app.state.service.store, "complete")
        job = submit(client, **QUICK)
        wait_for(lambda: healthz(client)[1]["workers"][0]["unrecorded"] == 1, what="the unrecorded outcome")
    monkeypatch.undo()
    with running(data) as client:  # the store's crash recovery: the job runs again
        done = wait_status(client, job["id"], ("completed", "failed"))
        assert done["status"] == "completed" and done["error"] is None


def test_faults_in_the_workers_bookkeeping(tmp_path, monkeypatch):
    with running(tmp_path / "data") as client:
        service = client.app.state.service
        broken = RuntimeError("a bug in the worker's bookkeeping")
        claims = refuse(monkeypatch, service.store, "claim", error=broken)
        counting = refuse(monkeypatch, service.generation, "observe", error=broken)
        job = submit(client, **QUICK)
        wait_for(lambda: "a bug" in (healthz(client)[1]["workers"][0]["fault"] or ""), what="the claim to fail")
        claims.clear()
        assert wait_status(client, job["id"], ("completed", "failed"))["status"] == "completed"
        counting.clear()

        # A claim that returns nonsense makes the worker's own code raise, outside any job: it goes on.
        real_claim, nonsense = service.store.claim, [object()]
        monkeypatch.setattr(service.store, "claim", lambda: nonsense.pop() if nonsense else real_claim())
        after = wait_status(client, submit(client, **QUICK)["id"], ("completed", "failed"))
        assert after["status"] == "completed" and not nonsense and healthz(client)[0] == 200


def test_a_job_error_shows_no_server_path(tmp_path):
    data = tmp_path / "data"
    with running(data) as client:
        worker = client.app.state.service.workers[0]

        def hook(i: int) -> None:
            upload = data.resolve() / "uploads" / "upload_0123.bin"
            raise CinematicError(f"cannot read {upload}: bad header; see /usr/lib/x86_64/libav.so and {data}/jobs")

        worker.pipeline = Hooked(worker.pipeline, hook)
        job = wait_status(client, submit(client, **QUICK)["id"], ("completed", "failed"))
        message = job["error"]["message"]
        assert message.startswith("cannot read the upload: bad header; see a server path and the data folder")
        no_server_path(message, data)


def test_the_scrubber():
    scrub = Scrubber([(Path("/srv/data/uploads"), "the upload"), (Path("/srv/data"), "the data folder")])
    assert scrub("no /srv/data/uploads/upload_1.bin or '/srv/data/x.mp4'") == "no the upload or 'the data folder'"
    assert scrub("/srv/database/x") == "a server path", "a folder is not a prefix of a longer name"
    assert scrub("frames 8/16 and a/b stay") == "frames 8/16 and a/b stay"
    relative = Scrubber([(Path("data"), "the data folder")])
    assert relative("the data in data/videos/a.mp4") == "the data in the data folder"


# --- /healthz --------------------------------------------------------------------------------------------


class Killed(BaseException):
    """What ends a thread for good (as SystemExit would): no ``except Exception`` catches it."""


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_healthz_reports_a_dead_worker(tmp_path):
    data = tmp_path / "data"
    with running(data) as client:
        assert healthz(client)[0] == 200 and healthz(client)[1]["status"] == "ok"
        worker = client.app.state.service.workers[0]

        def hook(i: int) -> None:
            raise Killed

        worker.pipeline = Hooked(worker.pipeline, hook)
        job = submit(client, **QUICK)
        status, health = wait_for(lambda: (h := healthz(client))[0] == 503 and h, what="the worker's death")
        assert health["status"] == "unhealthy" and health["workers"][0]["state"] == "dead"
        assert client.get(f"/v1/videos/{job['id']}").json()["status"] == "in_progress"
    with running(data) as client:  # a restart (what a 503 asks for) runs the job again: nothing is lost
        assert wait_status(client, job["id"], ("completed", "failed"))["status"] == "completed"
        assert healthz(client)[0] == 200


def test_healthz_reports_a_stuck_worker(tmp_path):
    with running(tmp_path / "data") as client:
        worker = client.app.state.service.workers[0]
        worker.stuck_floor = 0.5
        release = threading.Event()

        def hook(i: int) -> None:
            if i == 1:
                release.wait(120)

        worker.pipeline = Hooked(worker.pipeline, hook)
        job = submit(client, **QUICK)
        status, health = wait_for(lambda: (h := healthz(client))[0] == 503 and h, what="the worker to be stuck")
        state = health["workers"][0]
        assert health["status"] == "unhealthy" and state["state"] == "stuck" and state["job"] == job["id"]
        assert state["quiet_s"] >= state["stuck_after_s"] >= 0.5
        release.set()
        assert wait_status(client, job["id"], ("completed", "failed"))["status"] == "completed"
        assert wait_for(lambda: healthz(client)[0] == 200, what="the worker to be well again")


# --- storage faults in requests ------------------------------------------------------------------------------


def storage_error(response: Any, data: Path) -> str:
    assert response.status_code == 503, response.text
    error = response.json()["error"]
    assert error["type"] == "server_error" and error["code"] == "storage_error", error
    no_server_path(error["message"], data)
    return error["message"]


def test_storage_faults_answer_json_503(tmp_path, monkeypatch, disk_full):
    data = tmp_path / "data"
    with running(data) as client:
        store = client.app.state.service.store
        adding = refuse(monkeypatch, store, "add")
        assert "database or disk is full" in storage_error(client.post("/v1/videos", json=QUICK), data)
        adding.clear()
        job = submit(client, **QUICK)
        reading = refuse(monkeypatch, store, "get", error=sqlite3.DatabaseError("disk I/O error"))
        storage_error(client.get(f"/v1/videos/{job['id']}"), data)
        reading.clear()

        full = disk_full(data / "uploads")
        picture = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 64).decode()
        message = storage_error(client.post("/v1/videos", json={**QUICK, "init_image": picture}), data)
        assert "No space left on device" in message
        assert list((data / "uploads").iterdir()) == [], "no upload is kept for a job that was not queued"
        full.clear()


def test_delete_under_storage_faults_is_finished_by_a_retry(tmp_path, monkeypatch):
    data = tmp_path / "data"
    with running(data) as client:
        service = client.app.state.service
        job = wait_status(client, submit(client, **QUICK)["id"], ("completed",))
        assert client.get(f"/v1/videos/{job['id']}/content", params={"variant": "gif"}).status_code == 200
        mp4 = service.files.path(job["id"])

        # The row cannot be written: nothing changes but the gif (made again on request).
        tombstone = refuse(monkeypatch, service.store, "delete")
        storage_error(client.delete(f"/v1/videos/{job['id']}"), data)
        assert client.get(f"/v1/videos/{job['id']}").json()["status"] == "completed" and mp4.exists()
        assert client.get(f"/v1/videos/{job['id']}/content").status_code == 200
        tombstone.clear()

        # The row is a tombstone but the mp4 cannot be removed: a retry removes it.
        real_unlink = Path.unlink
        stuck = threading.Event()
        stuck.set()

        def unlink(path: Path, missing_ok: bool = False) -> None:
            if stuck.is_set() and path == mp4:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            real_unlink(path, missing_ok=missing_ok)

        monkeypatch.setattr(Path, "unlink", unlink)
        assert "Permission denied" in storage_error(client.delete(f"/v1/videos/{job['id']}"), data)
        assert client.get(f"/v1/videos/{job['id']}").status_code == 404 and mp4.exists()
        stuck.clear()
        retried = client.delete(f"/v1/videos/{job['id']}")
        assert retried.status_code == 200 and retried.json() == {
            "id": job["id"],
            "object": "video.deleted",
            "deleted": True,
        }
        assert list((data / "videos").iterdir()) == []
        assert client.delete(f"/v1/videos/{job['id']}").status_code == 404, "a third DELETE has nothing to do"


# --- the body: the key first, then its size ------------------------------------------------------------------


def test_body_limit_setting():
    default = Settings()
    assert default.body_limit == 2 * 4 * -(-default.limits.max_upload // 3) + JSON_ROOM
    assert resolve({}, {"CINEMATIC_MAX_BODY": "5000"}).body_limit == 5000
    assert resolve({"max_body": 7000}, {"CINEMATIC_MAX_BODY": "5000"}).body_limit == 7000
    assert resolve({}, {"CINEMATIC_MAX_UPLOAD": "3"}).body_limit == 2 * 4 + JSON_ROOM


def test_the_key_before_the_body_and_the_limit(tmp_path):
    with running(tmp_path / "data", api_key="k3y", max_body=4096) as client:
        key = {"Authorization": "Bearer k3y"}
        for body in (b"{bad", b"x" * 100_000):
            response = client.post("/v1/videos", content=body, headers={"Content-Type": "application/json"})
            assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        response = client.post("/v1/videos", content=b"x" * 5000, headers=key)
        assert response.status_code == 413
        assert response.json()["error"] == {
            "message": "the request body is over this server's limit of 4096 bytes (--max-body)",
            "type": "invalid_request_error",
            "param": None,
            "code": "body_too_large",
        }

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
            yield from (b"x" * 1000 for _ in range(5))

        response = client.post("/v1/videos", content=chunks(), headers=key)
        assert response.status_code == 413 and response.json()["error"]["code"] == "body_too_large"
        assert client.post("/v1/videos", json=QUICK, headers=key).status_code == 200
        assert client.post("/v1/videos", content=b"{bad", headers=key).status_code == 422


def raw_request(url: str, head: str, body_chunks: Iterator[bytes] | None = None) -> tuple[int, int]:
    """Send ``head`` and then as much of the body as the server reads before it answers; (status, bytes sent)."""
    host, port = url.removeprefix("http://").split(":")
    sent = 0
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall(head.encode())
        conn.settimeout(0.2)
        reply = b""
        for chunk in body_chunks or ():
            try:
                reply += conn.recv(65536)
            except TimeoutError:
                pass
            if reply:
                break
            try:
                conn.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
        conn.settimeout(30)
        while b"\r\n" not in reply:
            reply += conn.recv(65536)
    return int(reply.split(b" ", 2)[1]), sent


def test_a_huge_body_is_refused_before_it_is_read(tmp_path):
    """Over a real socket: the answer comes after the headers alone, none of the 300 MB declared is sent."""
    settings = quick_settings(tmp_path / "data", api_key="k3y", max_body=10_000)
    with serve_in_thread(create_app(settings)) as url:
        huge = "POST /v1/videos HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 300000000\r\n"
        assert raw_request(url, huge + "\r\n") == (401, 0)
        assert raw_request(url, huge + "Authorization: Bearer k3y\r\n\r\n") == (413, 0)
        chunked = (
            "POST /v1/videos HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k3y\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b"1000\r\n" + b"x" * 4096 + b"\r\n"
        status, sent = raw_request(url, chunked, iter([chunk] * 100))
        assert status == 413 and sent < 20 * len(chunk), "the server answered as soon as the limit was passed"


# --- small things ---------------------------------------------------------------------------------------


def test_invalid_utf8_is_a_422_in_the_api_shape(tmp_path):
    with running(tmp_path / "data") as client:
        body = b'{"prompt": "a red \xff circle"}'
        response = client.post("/v1/videos", content=body, headers={"Content-Type": "application/json"})
        assert response.status_code == 422
        error = response.json()["error"]
        assert error["code"] == "invalid_value" and error["type"] == "invalid_request_error"
        assert "UTF-8" in error["message"]


@pytest.mark.parametrize("device", ["bogus", "cuda", "cuda:99", "meta"])
def test_a_bad_device_is_one_line(device, tmp_path, capsys):
    if device.startswith("cuda") and torch.cuda.is_available() and device != "cuda:99":
        pytest.skip("this machine has CUDA")
    assert main(["serve", "--device", device, "--data", str(tmp_path / "data"), "--port", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: device {device!r}: "), err
    assert not (tmp_path / "data").exists()
    with pytest.raises(CinematicError, match="device"):
        Service(Settings(data=tmp_path / "data", devices=(device,)))
    assert not (tmp_path / "data").exists()


def test_limits_in_healthz(tmp_path):
    with running(tmp_path / "data", limits=Limits(max_upload=300)) as client:
        assert healthz(client)[1]["limits"]["max_body"] == 2 * 400 + JSON_ROOM
