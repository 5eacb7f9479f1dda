"""Decoding within a budget (issue 23): a tiny file that declares a huge canvas is refused from its headers, before
anything is decoded, by the library, the CLI and the server (a 422 naming the field, costing it under 100 MB); an
init video is decoded only as far as the call needs; one shorter than ``num_frames`` is refused at submission."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cinematic import video
from cinematic.budget import Budget
from cinematic.errors import CinematicError
from cinematic.generation.pictures import load_image, load_pictures, load_video
from tests.factories import bomb_gif, bomb_png, bomb_webp

ROOT = Path(__file__).resolve().parent.parent
BOMBS = {
    "bomb.gif": bomb_gif(frames=2),  # 66 bytes, two 16000x16000 frames
    "bomb.png": bomb_png(),
    "bomb.webp": bomb_webp(),
    "wide.gif": bomb_gif(5000, 5000),  # under Pillow's own bomb limit, over the budget's
}


@pytest.fixture
def bombs(tmp_path) -> dict[str, Path]:
    paths = {name: tmp_path / name for name in BOMBS}
    for name, path in paths.items():
        path.write_bytes(BOMBS[name])
    return paths


def test_huge_declared_frames_are_refused_before_decoding(bombs):
    for name, path in bombs.items():
        for read, args in [(video.read, (path,)), (load_video, (path, 2)), (load_image, (path,))]:
            start = time.monotonic()
            with pytest.raises(CinematicError, match="over the limit of 4096x4096 pixels") as caught:
                read(*args)
            assert "\n" not in str(caught.value) and str(path) in str(caught.value), name
            assert time.monotonic() - start < 5, name  # nothing was decoded
    with pytest.raises(CinematicError, match="its frames are 5000x5000"):
        load_image(bombs["wide.gif"])


def test_a_larger_budget_decodes_what_a_smaller_one_refuses(tmp_path):
    path = tmp_path / "wide.gif"
    path.write_bytes(bomb_gif(80, 60, frames=3))
    assert video.read(path).frames.shape == (3, 60, 80, 3)
    with pytest.raises(CinematicError, match="80x60, over the limit of 4,000 pixels"):
        video.read(path, budget=Budget(max_pixels=4000))
    assert load_image(path, Budget(max_pixels=80 * 60)).shape == (60, 80, 3)


def test_only_the_frames_asked_for_are_decoded(tmp_path):
    path = tmp_path / "long.gif"
    path.write_bytes(bomb_gif(64, 64, frames=50))
    small = Budget(max_frames=10, max_bytes=64 * 64 * 3 * 10)
    with pytest.raises(CinematicError, match="50 frames or more, over the limit of 10"):
        video.read(path, budget=small)
    assert video.read(path, num_frames=5, budget=small).frames.shape == (5, 64, 64, 3)
    with pytest.raises(CinematicError, match="20 frames were asked for, over the limit of 10"):
        video.read(path, num_frames=20, budget=small)
    with pytest.raises(CinematicError, match="12 frames of 64x64 decode to 147,456 bytes, over the limit of"):
        video.read(path, num_frames=12, budget=Budget(max_bytes=64 * 64 * 3 * 10))
    pictures = load_pictures(path, None, num_frames=7)
    assert pictures is not None and pictures.video.shape == (7, 64, 64, 3)


def test_frame_folders_and_webp_are_held_to_the_budget(tmp_path):
    frames = np.repeat(np.arange(0, 240, 40, dtype=np.uint8), 16 * 16 * 3).reshape(6, 16, 16, 3)  # all differ
    folder = video.write(tmp_path / "frames", frames)
    assert video.read(folder, num_frames=4).frames.shape == (4, 16, 16, 3)
    with pytest.raises(CinematicError, match="6 frames or more, over the limit of 5"):
        video.read(folder, budget=Budget(max_frames=5))
    clip = video.write(tmp_path / "clip.webp", frames)
    assert video.read(clip, num_frames=2).frames.shape == (2, 16, 16, 3)
    with pytest.raises(CinematicError, match="6 frames or more, over the limit of 5"):
        video.read(clip, budget=Budget(max_frames=5))


# ``python -m cinematic`` that writes its own peak RSS (VmHWM, kB) to $PEAK_FILE as it exits. The ru_maxrss of
# wait4 would not do: Linux keeps it across exec, so a child forked from this test process (torch loaded) would
# start from the test process's RSS and hide any growth below it. VmHWM belongs to the map exec makes anew.
PEAK_CLI = """
import atexit, os, runpy, sys
def peak():
    with open("/proc/self/status") as status:
        kb = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
    with open(os.environ["PEAK_FILE"], "w") as out:
        out.write(kb)
atexit.register(peak)
sys.argv[0] = "cinematic"
runpy.run_module("cinematic", run_name="__main__", alter_sys=True)
"""


def _peak_rss_mb(args: list[str], peak_file: Path) -> tuple[int, str, float]:
    """Run ``cinematic ARGS``; its exit code, stderr and its own peak resident memory in MB."""
    peak_file.unlink(missing_ok=True)
    command = [sys.executable, "-c", PEAK_CLI, *args]
    env = {**_env(), "PEAK_FILE": str(peak_file)}
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
    peak_kb = int(peak_file.read_text())
    peak_file.unlink()
    return done.returncode, done.stderr, peak_kb / 1024


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]), "OMP_NUM_THREADS": "1"}


def test_cli_init_image_bomb_is_one_line_quick_and_small(bombs, tmp_path):
    cli, peak_file = ["generate", "a cat", "-o", str(tmp_path / "out.mp4"), "--device", "cpu"], tmp_path / "peak"
    code, err, baseline = _peak_rss_mb([*cli, "--init-image", str(tmp_path / "missing.png")], peak_file)
    assert code == 2 and "no such init image" in err
    for flag, name in [("--init-image", "bomb.gif"), ("--init-image", "bomb.png"), ("--init-video", "bomb.gif")]:
        start = time.monotonic()
        code, err, peak = _peak_rss_mb([*cli, flag, str(bombs[name])], peak_file)
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
        assert "over the limit of 4096x4096 pixels" in err
        assert peak - baseline < 100, (name, peak, baseline)  # decoding the canvas would take 1.8 GB
        assert time.monotonic() - start < 60
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(BOMBS)


def test_short_init_video_is_refused_before_sampling():
    from cinematic.pipeline import Pipeline
    from cinematic.settings import SettingError

    pipe = Pipeline.from_pretrained("shapes")
    clip = load_pictures(np.zeros((3, 32, 32, 3), np.uint8), None)
    with pytest.raises(SettingError, match="num_frames: the init video has 3 frames, fewer than the 8 requested"):
        pipe.validate("a cat", pictures=clip, num_frames=8)
    assert pipe.validate("a cat", pictures=clip, num_frames=3).settings.num_frames == 3
    assert pipe.validate("a cat", pictures=clip).settings.num_frames == 3


# --- the server --------------------------------------------------------------------------------------------------


def _vm(pid: int, key: str) -> int:
    """A field of /proc/PID/status, in kB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {key} for {pid}")


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc")
def test_server_refuses_a_canvas_bomb_with_422_for_under_100_mb(bombs, tmp_path):
    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    from tests.serve_helpers import ServerProcess

    server = ServerProcess(tmp_path / "data", tmp_path / "server.log")
    try:
        pid = server.process.pid
        with server.client() as client:
            assert client.post("/v1/videos", json={"prompt": "a", "steps": 1}).status_code == 200  # warmed up
            # Peak RSS (VmHWM) starts again from the current RSS, so what follows is measured alone.
            Path(f"/proc/{pid}/clear_refs").write_text("5")
            before = _vm(pid, "VmRSS")
            for field, name in [("init_image", "bomb.gif"), ("init_video", "bomb.gif"), ("init_image", "bomb.png")]:
                upload = base64.b64encode(bombs[name].read_bytes()).decode()
                response = client.post("/v1/videos", json={"prompt": "a cat", field: upload})
                assert response.status_code == 422, response.text
                error = response.json()["error"]
                assert error["param"] == field and "over the limit of 4096x4096 pixels" in error["message"], error
                assert "/" not in error["message"], error  # no server path
            growth_mb = (_vm(pid, "VmHWM") - before) / 1024
        assert growth_mb < 100, growth_mb
        assert not [p for p in (tmp_path / "data" / "uploads").iterdir() if p.name.startswith("upload_")]
    finally:
        server.stop()


def test_server_refuses_an_init_video_shorter_than_num_frames(tmp_path):
    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    from tests.serve_helpers import running

    clip = video.write(tmp_path / "clip.mp4", np.zeros((3, 32, 32, 3), np.uint8))
    upload = base64.b64encode(clip.read_bytes()).decode()
    with running(tmp_path / "data") as client:
        response = client.post("/v1/videos", json={"prompt": "a cat", "init_video": upload, "num_frames": 8})
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["param"] == "num_frames" and "has 3 frames, fewer than the 8 requested" in error["message"]
        assert client.get("/v1/videos").json()["data"] == []
