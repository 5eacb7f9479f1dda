"""The server's fields beyond one text-to-video clip: prompt schedules and windows, uploaded init videos and images,
FreeU/FreeInit, and LoRA adapters from the server's own folder."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed")

from fastapi.testclient import TestClient  # noqa: E402

from cinematic import video  # noqa: E402
from cinematic.data.shapes import render_clip  # noqa: E402
from cinematic.serve.settings import Limits  # noqa: E402
from tests.serve_helpers import running, submit, wait_status  # noqa: E402

QUICK = {"steps": 3}


def rejected(client: TestClient, body: dict, param: str) -> str:
    response = client.post("/v1/videos", json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == param and "\n" not in error["message"], error
    return error["message"]


def finished(client: TestClient, job: dict) -> tuple[dict, video.VideoData]:
    job = wait_status(client, job["id"], ("completed", "failed"))
    assert job["status"] == "completed", job
    path = Path(client.app.state.service.files.path(job["id"]))
    return job, video.read(path)


def b64(path: Path, data_url: bool = False) -> str:
    text = base64.b64encode(path.read_bytes()).decode()
    return f"data:video/mp4;base64,{text}" if data_url else text


def uploads(data: Path) -> list[str]:
    return sorted(p.name for p in (data / "uploads").iterdir())


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("clip") / "clip.mp4"
    video.write(path, render_clip("a blue square moving up", 3, frames=8), fps=8)
    return path


@pytest.fixture(scope="module")
def picture_file(tmp_path_factory) -> Path:
    from PIL import Image

    path = tmp_path_factory.mktemp("picture") / "still.png"
    Image.fromarray(render_clip("a red circle moving left", 1)[0]).save(path)
    return path


def test_prompt_schedule_and_window(tmp_path):
    with running(tmp_path / "data") as client:
        schedule = "0: a red circle moving right | 12: a red circle moving left"
        job = submit(client, prompt_schedule=schedule, frames=24, window=8, **QUICK)
        assert job["prompt"] == "" and job["prompt_schedule"] == schedule and job["window"] == 8
        job, clip = finished(client, job)
        assert clip.frames.shape[0] == 24
        assert clip.metadata["prompt_schedule"] == schedule and clip.metadata["window"] == 8

        assert "is required" in rejected(client, {"steps": 3}, "prompt")
        assert "exclude each other" in rejected(client, {"prompt": "a", "prompt_schedule": "0: b"}, "prompt")
        assert "past the clip's last frame" in rejected(client, {"prompt_schedule": "0: a | 40: b"}, "prompt_schedule")
        assert "must start at frame 0" in rejected(client, {"prompt_schedule": "3: a"}, "prompt_schedule")
        rejected(client, {"prompt": "a", "frames": 16, "window": 1}, "window")
        assert len(client.get("/v1/videos").json()["data"]) == 1  # the rejected ones were not queued


def test_init_video_upload_restyles_the_clip_and_is_deleted_with_the_job(tmp_path, clip_file):
    data = tmp_path / "data"
    with running(data) as client:
        job = submit(client, prompt="a green square moving up", init_video=b64(clip_file, True), strength=0.5, **QUICK)
        assert job["init_video"] is True and job["strength"] == 0.5 and job["frames"] == 8  # the clip's count
        assert len(uploads(data)) == 1
        job, clip = finished(client, job)
        assert clip.frames.shape[0] == 8 and clip.metadata["strength"] == 0.5
        assert client.delete(f"/v1/videos/{job['id']}").status_code == 200
        assert uploads(data) == []


def test_init_image_animates_the_picture(tmp_path, picture_file):
    with running(tmp_path / "data") as client:
        job = submit(client, prompt="a red circle moving left", init_image=b64(picture_file), loop=True, **QUICK)
        assert job["init_image"] is True and job["loop"] is True
        _, clip = finished(client, job)
        from PIL import Image

        still = np.asarray(Image.open(picture_file).convert("RGB")).astype(np.int16)
        # The first frame is the picture up to the VAE round-trip (measured in tests/test_init_image.py).
        assert np.abs(clip.frames[0].astype(np.int16) - still).mean() < 40


def test_bad_uploads_are_422_and_leave_no_file(tmp_path, clip_file):
    data = tmp_path / "data"
    with running(data, limits=Limits(max_upload=4000)) as client:
        assert "init video only" in rejected(client, {"prompt": "a", "strength": 0.5}, "strength")
        assert "not valid base64" in rejected(client, {"prompt": "a", "init_video": "%%%"}, "init_video")
        junk = base64.b64encode(b"not a video at all" * 10).decode()
        assert "cannot read" in rejected(client, {"prompt": "a", "init_video": junk}, "init_video")
        assert "cannot read" in rejected(client, {"prompt": "a", "init_image": junk}, "init_image")
        big = base64.b64encode(b"x" * 4001).decode()
        assert "over this server's 4000" in rejected(client, {"prompt": "a", "init_video": big}, "init_video")
        both = {"prompt": "a", "init_video": b64(clip_file), "init_image": b64(clip_file)}
        if clip_file.stat().st_size <= 4000:
            assert "not both" in rejected(client, both, "init_video")
        assert uploads(data) == []
        assert client.get("/v1/videos").json()["data"] == []


def test_freeu_and_freeinit_reach_the_pipeline(tmp_path):
    with running(tmp_path / "data") as client:
        job = submit(client, prompt="a red circle moving left", frames=4, freeu=True, freeinit=1, **QUICK)
        _, clip = finished(client, job)
        assert clip.metadata["freeu"] is True and clip.metadata["freeinit"] == 1


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory) -> Path:
    import torch

    from cinematic.models import lora_adapters as lora_modules
    from cinematic.models.lora_adapters import LoRAConfig
    from cinematic.pipeline import Pipeline
    from cinematic.weights.lora_formats import write_adapter

    unet = Pipeline.from_pretrained("shapes").model.unet
    generator = torch.Generator().manual_seed(0)
    adapters = lora_modules.add_lora(unet, LoRAConfig(2, 2.0, "both"), "wiggle")
    with torch.no_grad():
        for a in adapters.values():
            a.down.weight.copy_(torch.randn(a.down.weight.shape, generator=generator))
            a.up.weight.copy_(torch.randn(a.up.weight.shape, generator=generator))
    state = lora_modules.adapter_state(unet, "wiggle")
    folder = tmp_path_factory.mktemp("loras")
    write_adapter(folder / "wiggle", state, 2, 2.0, "both", torch.float32)
    return folder


def test_loras_come_from_the_servers_folder_only(tmp_path, lora_dir):
    with running(tmp_path / "data", lora_dir=lora_dir) as client:
        assert client.get("/healthz").json()["loras"] == ["wiggle"]
        base = submit(client, **base_body(), seed=1)
        adapted = submit(client, **base_body(), seed=1, loras=[{"name": "wiggle", "scale": 1.0}])
        assert adapted["loras"] == [{"name": "wiggle", "scale": 1.0}]
        (_, plain), (_, changed) = finished(client, base), finished(client, adapted)
        assert not np.array_equal(plain.frames, changed.frames)
        message = rejected(client, {"prompt": "a", "loras": [{"name": "other"}]}, "loras")
        assert "no adapter 'other'" in message and "offered: wiggle" in message
        for name in ("../wiggle", "/etc/passwd", ".hidden"):
            rejected(client, {"prompt": "a", "loras": [{"name": name}]}, "loras.0.name")
    with running(tmp_path / "data2") as client:
        assert "--lora-dir" in rejected(client, {"prompt": "a", "loras": [{"name": "wiggle"}]}, "loras")


def base_body() -> dict:
    return {"prompt": "a red circle moving left", "frames": 4, **QUICK}


def test_uploads_no_job_refers_to_are_swept_at_start(tmp_path):
    """A server stopped between saving an upload and queueing its job leaves the file behind; the next start
    removes it, and keeps the uploads of the jobs it still holds."""
    from cinematic.serve.files import Inputs
    from cinematic.serve.store import Params, Store
    from cinematic.settings import Settings

    store, inputs = Store(tmp_path), Inputs(tmp_path / "uploads")
    kept, orphan = inputs.save(b"a clip"), inputs.save(b"another clip")
    half_written = inputs.folder / ".tmp-abc"
    half_written.write_bytes(b"half")
    other = inputs.folder / "notes.txt"  # not ours to remove
    other.write_text("x")
    settings = Settings(prompt_schedule="0: a red circle", num_inference_steps=10, seed=1, strength=0.6)
    params = Params(settings, "shapes", init_video=kept)
    store.add(params, max_queue=10)
    try:
        assert store.upload_names() == {kept}
        assert inputs.sweep(store.upload_names()) == 2
    finally:
        store.close()
    assert sorted(p.name for p in inputs.folder.iterdir()) == sorted([kept, "notes.txt"])
    assert orphan not in {p.name for p in inputs.folder.iterdir()}
