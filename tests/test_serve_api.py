"""The HTTP API against the real app (httpx, through Starlette's TestClient, with the workers running). The tests
of a job's life (``store``) run on both stores: SQLite in the data folder, and a PostgreSQL database.

Jobs use the bundled shapes model with a few steps, so a whole generation takes about a second. Jobs meant to
stay running (to cancel them, or to fill the queue) ask for thousands of steps and are cancelled by the test.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed")

from fastapi.testclient import TestClient  # noqa: E402

from cinematic import video  # noqa: E402
from cinematic.cli import main  # noqa: E402
from cinematic.errors import CinematicError  # noqa: E402
from cinematic.serve.service import Service  # noqa: E402
from cinematic.serve.settings import Limits, resolve  # noqa: E402
from tests.serve_helpers import quick_settings, running, submit, wait_for, wait_status  # noqa: E402

QUICK = {"prompt": "a red circle moving left", "steps": 4, "frames": 8}
LONG = {"prompt": "a blue square moving up", "steps": 1000}  # minutes: it only ever gets cancelled
ROOMY = Limits(max_steps=1000)


def files(data: Path) -> list[str]:
    return sorted(p.name for p in (data / "videos").iterdir())


def running_job(client: TestClient, body: dict) -> dict:
    """Submit ``body`` and wait until a worker has made at least one step of it."""
    job = submit(client, **body)
    wait_for(lambda: client.get(f"/v1/videos/{job['id']}").json()["progress"] > 0, what="the first step")
    return job


def test_whole_life_of_a_job(tmp_path, store):
    data = tmp_path / "data"
    with running(data, store=store) as client:
        job = submit(client, **QUICK, seed=7, size="32x32", sampler="dpmpp_2m")
        assert re.fullmatch(r"video_[A-Za-z0-9_-]{24}", job["id"])
        assert job["object"] == "video" and job["status"] == "queued" and job["progress"] == 0
        assert job["seed"] == 7 and job["size"] == "32x32" and job["frames"] == 8 and job["seconds"] == "1"
        assert job["model"] == "shapes" and job["completed_at"] is None and job["error"] is None

        seen = []

        def completed() -> dict | None:
            current = client.get(f"/v1/videos/{job['id']}").json()
            seen.append(current["progress"])
            return current if current["status"] == "completed" else None

        done = wait_for(completed, timeout=120)
        assert done["progress"] == 100 and done["completed_at"] >= done["started_at"] >= done["created_at"]
        assert seen == sorted(seen), "progress never goes back"

        response = client.get(f"/v1/videos/{job['id']}/content")
        assert response.status_code == 200 and response.headers["content-type"] == "video/mp4"
        mp4 = response.content
        (tmp_path / "clip.mp4").write_bytes(mp4)
        clip = video.read(tmp_path / "clip.mp4")
        assert clip.frames.shape == (8, 32, 32, 3) and clip.fps == 8
        assert clip.metadata["seed"] == 7 and clip.metadata["model"] == "shapes" and clip.metadata["steps"] == 4

        part = client.get(f"/v1/videos/{job['id']}/content", headers={"Range": "bytes=100-199"})
        assert part.status_code == 206 and part.content == mp4[100:200]
        assert part.headers["content-range"] == f"bytes 100-199/{len(mp4)}"
        outside = client.get(f"/v1/videos/{job['id']}/content", headers={"Range": f"bytes={len(mp4) + 10}-"})
        assert outside.status_code == 416

        for variant, media in (("webm", "video/webm"), ("gif", "image/gif")):
            response = client.get(f"/v1/videos/{job['id']}/content", params={"variant": variant})
            assert response.status_code == 200 and response.headers["content-type"] == media
            path = tmp_path / f"clip.{variant}"
            path.write_bytes(response.content)
            assert video.read(path).frames.shape == (8, 32, 32, 3)
        assert files(data) == [f"{job['id']}.{v}" for v in ("gif", "mp4", "webm")]

        metrics = client.get("/metrics")
        assert metrics.headers["content-type"].startswith("text/plain; version=0.0.4")
        assert 'cinematic_jobs{status="completed"} 1' in metrics.text
        assert "cinematic_queue_depth 0" in metrics.text and "cinematic_generation_seconds_count 1" in metrics.text
        assert client.get("/healthz").json()["status"] == "ok"


def test_list_newest_first_with_cursor(tmp_path, store):
    with running(tmp_path / "data", store=store) as client:
        ids = [submit(client, prompt=f"clip {i}", steps=1, frames=2)["id"] for i in range(5)]
        newest_first = ids[::-1]
        pages, after = [], None
        while True:
            page = client.get("/v1/videos", params={"limit": 2, **({"after": after} if after else {})}).json()
            assert page["object"] == "list" and page["first_id"] == page["data"][0]["id"]
            pages.append([job["id"] for job in page["data"]])
            if not page["has_more"]:
                break
            after = page["last_id"]
        assert pages == [newest_first[0:2], newest_first[2:4], newest_first[4:]]

        # A cursor whose job was deleted still works: the store keeps a tombstone of it.
        wait_status(client, ids[3], ("completed",))
        assert client.delete(f"/v1/videos/{ids[3]}").json()["deleted"] is True
        rest = client.get("/v1/videos", params={"after": ids[3]}).json()
        assert [job["id"] for job in rest["data"]] == ids[2::-1]
        assert ids[3] not in [job["id"] for job in client.get("/v1/videos").json()["data"]]

        unknown = client.get("/v1/videos", params={"after": "video_" + "x" * 24})
        assert unknown.status_code == 422 and unknown.json()["error"]["param"] == "after"
        assert client.get("/v1/videos", params={"limit": 0}).json()["error"]["param"] == "limit"
        empty = client.get("/v1/videos", params={"after": ids[0]}).json()
        assert empty["data"] == [] and empty["has_more"] is False and empty["first_id"] is None


def test_cancel_running_and_queued_jobs(tmp_path, store):
    data = tmp_path / "data"
    with running(data, limits=ROOMY, store=store) as client:
        first = running_job(client, LONG)
        second = submit(client, **LONG)
        assert client.get(f"/v1/videos/{second['id']}").json()["status"] == "queued"

        cancelled = client.delete(f"/v1/videos/{second['id']}").json()
        assert cancelled["status"] == "cancelled" and cancelled["completed_at"] is not None
        cancelled = client.delete(f"/v1/videos/{first['id']}").json()
        assert cancelled["status"] == "cancelled"
        # The worker stops within a step and takes the next job.
        wait_for(lambda: not client.get("/healthz").json()["workers"][0]["busy"], what="the worker to stop")
        after = submit(client, **QUICK)
        wait_status(client, after["id"], ("completed",), timeout=120)

        assert client.get(f"/v1/videos/{first['id']}").json()["status"] == "cancelled"
        response = client.get(f"/v1/videos/{first['id']}/content")
        assert response.status_code == 409 and response.json()["error"]["code"] == "not_ready"
        assert files(data) == [f"{after['id']}.mp4"], "a cancelled job leaves no file"
        # A second DELETE deletes the cancelled job.
        assert client.delete(f"/v1/videos/{first['id']}").json() == {
            "id": first["id"],
            "object": "video.deleted",
            "deleted": True,
        }
        assert client.get(f"/v1/videos/{first['id']}").status_code == 404


def test_delete_finished_job_with_its_files(tmp_path, store):
    data = tmp_path / "data"
    with running(data, store=store) as client:
        job = submit(client, **QUICK)
        wait_status(client, job["id"], ("completed",), timeout=120)
        assert client.get(f"/v1/videos/{job['id']}/content", params={"variant": "gif"}).status_code == 200
        assert len(files(data)) == 2
        assert client.delete(f"/v1/videos/{job['id']}").json()["deleted"] is True
        assert files(data) == []
        for method, path in [
            ("GET", f"/v1/videos/{job['id']}"),
            ("GET", f"/v1/videos/{job['id']}/content"),
            ("DELETE", f"/v1/videos/{job['id']}"),
        ]:
            assert client.request(method, path).status_code == 404
        assert client.get("/v1/videos").json()["data"] == []


def test_unknown_ids_are_404(tmp_path):
    with running(tmp_path / "data") as client:
        for video_id in ["video_" + "A" * 24, "nope", "..", "video_%2e%2e", "x" * 500]:
            for method, suffix in [("GET", ""), ("GET", "/content"), ("DELETE", "")]:
                response = client.request(method, f"/v1/videos/{video_id}{suffix}")
                assert response.status_code == 404, (video_id, suffix)
                assert response.json()["error"]["type"] == "not_found_error"
        assert client.get("/v1/videos/../../etc/passwd").status_code == 404


BAD_FIELDS = {
    "prompt missing": ({"steps": 4}, "prompt"),
    "prompt blank": ({"prompt": "   "}, "prompt"),
    "prompt too long": ({"prompt": "x" * 1001}, "prompt"),
    "prompt not text": ({"prompt": 42}, "prompt"),
    "negative prompt too long": ({"negative_prompt": "x" * 1001}, "negative_prompt"),
    "other model": ({"model": "sora-2"}, "model"),
    "frames 0": ({"frames": 0}, "frames"),
    "frames over limit": ({"frames": 65}, "frames"),
    "frames as text": ({"frames": "16"}, "frames"),
    "frames fractional": ({"frames": 16.5}, "frames"),
    "size not a multiple of 8": ({"size": "36x32"}, "size"),
    "size under the model's minimum": ({"size": "16x16"}, "size"),
    "size over limit": ({"size": "2048x1024"}, "size"),
    "size malformed": ({"size": "32"}, "size"),
    "steps 0": ({"steps": 0}, "steps"),
    "steps over limit": ({"steps": 201}, "steps"),
    "guidance negative": ({"guidance": -1}, "guidance"),
    "guidance huge": ({"guidance": 1e9}, "guidance"),
    "guidance as text": ({"guidance": "9"}, "guidance"),
    "seed negative": ({"seed": -1}, "seed"),
    "seed over 32 bits": ({"seed": 2**32}, "seed"),
    "seed boolean": ({"seed": True}, "seed"),
    "unknown sampler": ({"sampler": "plms"}, "sampler"),
    "unknown field": ({"seconds": "4"}, "seconds"),
}


@pytest.fixture(scope="module")
def idle_client(tmp_path_factory) -> Iterator[TestClient]:
    with running(tmp_path_factory.mktemp("serve-422") / "data") as client:
        yield client


@pytest.mark.parametrize("case", list(BAD_FIELDS))
def test_each_bad_field_is_422_naming_it(idle_client, case):
    fields, name = BAD_FIELDS[case]
    body = fields if name == "prompt" else {"prompt": "a red circle", **fields}
    response = idle_client.post("/v1/videos", json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == name and error["message"].startswith(f"{name}: ") and "\n" not in error["message"]
    assert idle_client.get("/v1/videos").json()["data"] == [], "nothing was queued"


def test_body_that_is_not_json_is_422(idle_client):
    response = idle_client.post("/v1/videos", content=b"{not json", headers={"Content-Type": "application/json"})
    assert response.status_code == 422 and "not valid JSON" in response.json()["error"]["message"]
    assert idle_client.post("/v1/videos").status_code == 422


def test_full_queue_is_429(tmp_path, store):
    with running(tmp_path / "data", max_queue=2, limits=ROOMY, store=store) as client:
        running_job(client, LONG)  # the worker is busy with it: the two next ones wait
        waiting = [submit(client, **LONG) for _ in range(2)]
        response = client.post("/v1/videos", json=QUICK)
        assert response.status_code == 429
        assert response.json()["error"]["code"] == "queue_full" and int(response.headers["retry-after"]) >= 1
        assert "cinematic_queue_depth 2" in client.get("/metrics").text
        client.delete(f"/v1/videos/{waiting[0]['id']}")
        assert client.post("/v1/videos", json=QUICK).status_code == 200, "room again after a cancel"
        for job in client.get("/v1/videos").json()["data"]:
            client.delete(f"/v1/videos/{job['id']}")


def test_api_key(tmp_path):
    with running(tmp_path / "data", api_key="s3cret-key") as client:
        for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic czNjcmV0LWtleQ=="}]:
            for path in ["/v1/videos", "/v1/videos/video_" + "A" * 24, "/metrics"]:
                response = client.get(path, headers=headers)
                assert response.status_code == 401, (path, headers)
                assert response.headers["www-authenticate"] == "Bearer"
            assert client.post("/v1/videos", json=QUICK, headers=headers).status_code == 401
        assert client.get("/v1/videos").json()["error"]["type"] == "authentication_error"
        assert client.get("/v1/videos", headers={"Authorization": "Bearer s3cret-key"}).status_code == 200
        assert client.get("/metrics", headers={"Authorization": "Bearer s3cret-key"}).status_code == 200
        # The page and the health check stay open: the page asks for the key itself.
        assert client.get("/healthz").json()["auth"] is True
        assert client.get("/").status_code == 200


def test_page_and_schema(tmp_path):
    with running(tmp_path / "data") as client:
        page = client.get("/")
        assert page.headers["content-type"].startswith("text/html") and 'id="create"' in page.text
        assert client.get("/static/app.js").status_code == 200
        assert client.get("/static/../store.py").status_code == 404
        schema = client.get("/openapi.json").json()
        assert {"/v1/videos", "/v1/videos/{video_id}", "/v1/videos/{video_id}/content", "/healthz", "/metrics"} <= set(
            schema["paths"]
        )
        frames = schema["components"]["schemas"]["VideoCreate"]["properties"]["frames"]
        assert frames["anyOf"][0]["maximum"] == 64, "the schema states this server's limits"


def test_refuses_public_address_without_key(tmp_path, capsys):
    assert main(["serve", "--host", "0.0.0.0", "--data", str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "refusing to listen on 0.0.0.0 without an API key" in err[0]
    assert not (tmp_path / "data").exists()


def test_busy_port_and_bad_settings_are_one_line(tmp_path, capsys, monkeypatch):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--port", str(port), "--data", str(tmp_path / "data")]) == 2
    assert "cannot listen on 127.0.0.1" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()
    monkeypatch.setenv("CINEMATIC_MAX_QUEUE", "lots")
    assert main(["serve", "--data", str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: CINEMATIC_MAX_QUEUE='lots' is not valid: not an integer"]


def test_settings_from_environment_and_flags():
    env = {"CINEMATIC_PORT": "9001", "CINEMATIC_API_KEY": "k", "CINEMATIC_MAX_STEPS": "30", "CINEMATIC_DEVICES": "a,b"}
    settings = resolve({"port": 9002}, env)
    assert settings.port == 9002, "a flag wins over the environment"
    assert settings.api_key == "k" and settings.limits.max_steps == 30 and settings.devices == ("a", "b")
    assert settings.host == "127.0.0.1", "loopback by default"


def test_one_server_per_data_folder(tmp_path):
    first = Service(quick_settings(tmp_path))
    try:
        with pytest.raises(CinematicError, match="in use by another cinematic serve"):
            Service(quick_settings(tmp_path))
    finally:
        first.close()
    Service(quick_settings(tmp_path)).close()
