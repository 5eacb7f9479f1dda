"""The probe's cases against a real ``cinematic serve`` (the shapes model, one CPU thread, an API key, a 2 MB body
limit) on a free localhost port: uploads that declare a huge canvas (with the server's RSS measured), bodies,
keys, fields, ids and ranges, a ``kill -9`` with jobs queued, and a data folder on a disk that fills mid-job."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import httpx
import numpy as np
from _probe_base import Case, Probe, Tmpfs, guarded
from tests.serve_helpers import ServerProcess, wait_for
from tests.test_serve_faults import raw_request

KEY = "probe-k3y"
MAX_BODY = 2_000_000
JOB = {"prompt": "a red circle moving left", "steps": 2, "frames": 4}
FINISHED = ("completed", "failed", "cancelled")


def _server(data: Path, log: Path, *args: str) -> ServerProcess:
    return ServerProcess(data, log, "--api-key", KEY, "--max-body", str(MAX_BODY), *args)


def _client(server: ServerProcess) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)


def _status(client: httpx.Client, video_id: str, statuses: tuple[str, ...], timeout: float = 300) -> dict:
    def check() -> dict | None:
        job = client.get(f"/v1/videos/{video_id}").json()
        return job if job["status"] in statuses else None

    return wait_for(check, timeout, every=0.2, what=f"{video_id} to be {'/'.join(statuses)}")


def _vm_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/{pid}/status")


def _error_case(probe: Probe, group: str, name: str, response: httpx.Response, status: int, params: set) -> None:
    """A 4xx in the API's error shape, naming one of ``params`` (``{None}`` where no field is at fault)."""
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        error = {}
    ok = response.status_code == status and bool(error.get("message")) and error.get("param") in params
    ok = ok and "Traceback" not in response.text and not re.search(r"/\w+/", str(error.get("message")))
    got = f"{response.status_code} param={error.get('param')!r} code={error.get('code')!r}: "
    expected = f"{status}, param in {sorted(params, key=str)}"
    probe.add(Case(group, name, expected, got + str(error.get("message"))[:80], ok))


def bombs(probe: Probe, server: ServerProcess, client: httpx.Client) -> None:
    from tests.factories import bomb_gif, bomb_png

    pid = server.process.pid
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # the peak (VmHWM) starts again from the RSS now
    before = _vm_kb(pid, "VmRSS")
    uploads = [("init_image", "gif", bomb_gif()), ("init_video", "gif", bomb_gif(frames=2)), ("init_image", "png",
               bomb_png())]  # fmt: skip
    for field, kind, data in uploads:
        response = client.post("/v1/videos", json={"prompt": "a cat", field: base64.b64encode(data).decode()})
        _error_case(probe, "upload", f"{field}: a {len(data)}-byte {kind} declaring 16000x16000", response, 422,
                    {field})  # fmt: skip
    growth = (_vm_kb(pid, "VmHWM") - before) / 1024
    probe.add(Case("upload", "the server's peak RSS growth over the three uploads", "under 100 MB",
                   f"{growth:.1f} MB", growth < 100, measured={"rss_growth_mb": round(growth, 1)}))  # fmt: skip


def bodies_and_keys(probe: Probe, server: ServerProcess, client: httpx.Client) -> None:
    post = "POST /v1/videos HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    huge = post + "Content-Length: 300000000\r\n"
    chunk = b"10000\r\n" + b"x" * 65536 + b"\r\n"
    cases = {
        "300 MB declared, no key": (huge + "\r\n", iter(()), 401),
        "300 MB declared, with the key": (huge + f"Authorization: Bearer {KEY}\r\n\r\n", iter(()), 413),
        "chunked past the limit, with the key": (
            post + f"Authorization: Bearer {KEY}\r\nTransfer-Encoding: chunked\r\n\r\n", iter([chunk] * 200), 413),
    }  # fmt: skip
    for name, (head, chunks, status) in cases.items():
        got, sent = raw_request(server.url, head, chunks)
        ok = got == status and sent < MAX_BODY + 4 * len(chunk)
        probe.add(Case("body", name, f"{status} before the body is read", f"{got} after {sent:,} body bytes", ok))
    anonymous = httpx.Client(base_url=server.url, timeout=60)
    keys = {
        "without a key": None,
        "with a wrong key": "Bearer nope",
        "with Basic auth": "Basic " + base64.b64encode(b"a:b").decode(),
        "with an empty bearer": "Bearer",
        "with a non-ASCII key": "Bearer k\xe9y".encode("latin-1"),
    }
    for name, authorization in keys.items():
        headers = {"Content-Type": "application/json", **({"Authorization": authorization} if authorization else {})}
        response = anonymous.post("/v1/videos", content=b"{bad", headers=headers)
        _error_case(probe, "key", f"{{bad {name}", response, 401, {None})
    anonymous.close()
    response = client.post("/v1/videos", content=b"{bad", headers={"Content-Type": "application/json"})
    _error_case(probe, "body", "{bad with the key", response, 422, {None, "body"})
    body = b'{"prompt": "a red \xff circle"}'
    response = client.post("/v1/videos", content=body, headers={"Content-Type": "application/json"})
    _error_case(probe, "body", "invalid UTF-8 in the body", response, 422, {None, "body", "prompt"})


def fields(probe: Probe, client: httpx.Client, short_clip: bytes) -> None:
    clip = base64.b64encode(short_clip).decode()
    cases = {
        "frames 1 with loop": ({"frames": 1, "loop": True}, {"loop", "frames", "num_frames"}),
        'steps "abc"': ({"steps": "abc"}, {"steps", "num_inference_steps"}),
        "steps -1": ({"steps": -1}, {"steps", "num_inference_steps"}),
        "steps 10**9": ({"steps": 10**9}, {"steps", "num_inference_steps"}),
        "frames 10**6": ({"frames": 10**6}, {"frames", "num_frames"}),
        'size "0x0"': ({"size": "0x0"}, {"size"}),
        'seed "x"': ({"seed": "x"}, {"seed"}),
        "an unknown field": ({"bogus": 1}, {"bogus"}),
        "init_image not base64": ({"init_image": "!!not base64!!"}, {"init_image"}),
        "init_video of 3 frames, num_frames 8": ({"init_video": clip, "num_frames": 8}, {"num_frames"}),
        "a LoRA name with ..": ({"loras": [{"name": "../x"}]}, {"loras", "loras.0.name", "loras[0].name"}),
        "prompt a number": ({"prompt": 5}, {"prompt"}),
    }
    for name, (body, params) in cases.items():
        response = client.post("/v1/videos", json={"prompt": "a cat", **body})
        _error_case(probe, "field", name, response, 422, params)
    response = client.post("/v1/videos", json={})
    _error_case(probe, "field", "no prompt", response, 422, {"prompt"})
    response = client.post(
        "/v1/videos", content=b'{"prompt": "a \\ud800 b"}', headers={"Content-Type": "application/json"}
    )
    _error_case(probe, "field", "a lone surrogate in the prompt", response, 422, {"prompt"})
    response = client.get("/v1/videos", params={"limit": 0})
    _error_case(probe, "field", "list limit 0", response, 422, {"limit"})


def ids_and_ranges(probe: Probe, client: httpx.Client, done: str) -> None:
    for path in ("/v1/videos/..%2F..%2Fetc%2Fpasswd", "/v1/videos/%2e%2e", "/v1/videos/video_%00/content",
                 "/v1/videos/" + "a" * 5000):  # fmt: skip
        for method in ("GET", "DELETE"):
            response = client.request(method, path)
            ok = 400 <= response.status_code < 500 and "Traceback" not in response.text
            probe.add(Case("id", f"{method} {path[:50]}", "a 4xx", f"{response.status_code}", ok))
    for spec in ("bytes=99999999-", "bytes=5-2", "bytes=-0", "bytes=" + ",".join(f"{i}-{i}" for i in range(500)),
                 "items=0-1", "bytes=0-1"):  # fmt: skip
        response = client.get(f"/v1/videos/{done}/content", headers={"Range": spec})
        wanted = response.status_code == 206 and len(response.content) == 2 if spec == "bytes=0-1" else True
        ok = wanted and (response.status_code in (200, 206) or 400 <= response.status_code < 500)
        expected = "206, 2 bytes" if spec == "bytes=0-1" else "200, 206 or a 4xx"
        probe.add(Case("range", f"Range: {spec[:40]}", expected, f"{response.status_code}", ok))


def no_job_lost(probe: Probe, data: Path) -> None:
    """Queue six jobs, ``kill -9`` the server while they run, start it again: each ends completed, listed once."""
    server = _server(data, data.parent / "server.log")
    with _client(server) as client:
        ids = [client.post("/v1/videos", json={**JOB, "steps": 6}).json()["id"] for _ in range(6)]
        _status(client, ids[1], ("in_progress", "completed"))
    server.kill()
    server = _server(data, data.parent / "server-restart.log")  # a log of its own: the helper reads the URL off it
    try:
        with _client(server) as client:
            jobs = [_status(client, i, FINISHED) for i in ids]
            listed = [job["id"] for job in client.get("/v1/videos", params={"limit": 100}).json()["data"]]
            content = [client.get(f"/v1/videos/{i}/content").status_code for i in ids]
    finally:
        server.stop()
    lost = sum(job["status"] != "completed" for job in jobs) + len(set(ids) - set(listed))
    twice = len(listed) - len(set(listed))
    ok = lost == 0 and twice == 0 and content == [200] * 6
    probe.add(Case("jobs", "six jobs across a kill -9", "6 completed, each listed once, each mp4 served",
                   f"{sum(j['status'] == 'completed' for j in jobs)} completed, {lost} lost, {twice} listed twice",
                   ok, measured={"jobs_lost": lost, "jobs_listed_twice": twice}))  # fmt: skip


def _fill_mid_job(disk: Tmpfs, client: httpx.Client) -> tuple[dict, dict, int, list[str]]:
    """A 60-step job, the disk filled while it runs and freed once the worker is idle again, then a second job."""
    first = client.post("/v1/videos", json={**JOB, "steps": 60, "frames": 16}).json()["id"]
    _status(client, first, ("in_progress",))
    filler = disk.fill()
    wait_for(lambda: client.get("/healthz").json()["workers"][0]["state"] == "idle", 300, 0.2, "the worker idle")
    filler.unlink()
    failed = _status(client, first, FINISHED)
    second = _status(client, client.post("/v1/videos", json=JOB).json()["id"], FINISHED)
    health = client.get("/healthz").status_code
    return failed, second, health, sorted(p.name for p in (disk.folder / "data" / "videos").iterdir())


def disk_fills_mid_job(probe: Probe) -> None:
    """The issue's case: the data folder on a small tmpfs, filled while a 60-step job runs, then freed."""
    name = "the disk fills during a 60-step job, then is freed"
    disk = Tmpfs(probe.fresh("serve-tmpfs") / "disk", "16m").mount()
    if disk is None:
        probe.add(Case("storage", name, "-", "-", False, not_run="mount needs root"))
        return
    log = disk.folder.parent / "server.log"
    try:
        server = _server(disk.folder / "data", log)
        try:
            with _client(server) as client:
                failed, second, health, videos = _fill_mid_job(disk, client)
        finally:
            server.stop()
    finally:
        disk.unmount()
    message = (failed.get("error") or {}).get("message", "")
    ok = failed["status"] == "failed" and second["status"] == "completed" and health == 200
    ok = ok and videos == [f"{second['id']}.mp4"] and not re.search(r"/\w+/", message)
    got = f"first {failed['status']} ({message[:60]}), second {second['status']}, healthz {health}, videos {videos}"
    probe.add(Case("storage", name, "first failed without a path, second completed, healthz 200, no stray file",
                   got, ok, traceback="Traceback" in log.read_text()))  # fmt: skip


def _one_server(probe: Probe, base: Path) -> None:
    """Every case that one server answers in turn."""
    from cinematic import video

    short = video.write(base / "short.mp4", np.zeros((3, 32, 32, 3), np.uint8)).read_bytes()
    server = _server(base / "data", base / "server.log")
    try:
        with _client(server) as client:
            done = _status(client, client.post("/v1/videos", json=JOB).json()["id"], FINISHED)
            probe.add(Case("jobs", "a first job", "completed", done["status"], done["status"] == "completed"))
            guarded(probe, "upload", bombs, server, client)
            guarded(probe, "body", bodies_and_keys, server, client)
            guarded(probe, "field", fields, client, short)
            guarded(probe, "id", ids_and_ranges, client, done["id"])
            folder = base / "data" / "uploads"
            uploads = [p.name for p in folder.iterdir() if p.name.startswith("upload_")] if folder.exists() else []
            probe.add(Case("upload", "uploads kept for refused requests", "none", f"{uploads}", not uploads,
                           left_behind=uploads))  # fmt: skip
    finally:
        server.stop()


def run_all(probe: Probe) -> list[Path]:
    """Every server case; the server logs, for the traceback count."""
    base, jobs = probe.fresh("serve"), probe.fresh("serve-kill")
    guarded(probe, "server", _one_server, base)
    guarded(probe, "jobs", no_job_lost, jobs / "data")
    guarded(probe, "storage", disk_fills_mid_job)
    return [base / "server.log", jobs / "server.log", jobs / "server-restart.log"]  # the tmpfs case judges its own log


def log_tracebacks(logs: list[Path]) -> int:
    return sum(log.read_text().count("Traceback") for log in logs if log.exists())
