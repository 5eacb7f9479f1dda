"""``cinematic generate``: files, names, seeds, and one clear line with exit code 2 for every bad input."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cinematic import video
from cinematic.cli import main
from tests.factories import make_diffusers_folder

QUICK = ["--num-inference-steps", "2", "--num-frames", "2", "--height", "32", "--width", "32"]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return str(make_diffusers_folder(tmp_path_factory.mktemp("cli") / "model"))


def test_generate_writes_video_with_metadata(model, tmp_path, capsys):
    out = tmp_path / "clip.mp4"
    assert main(["generate", "a red cat", "-o", str(out), "--model", model, "--seed", "42", *QUICK]) == 0
    printed = capsys.readouterr()
    assert f"wrote {out} (seed 42)" in printed.out
    clip = video.read(out)
    assert clip.frames.shape == (2, 32, 32, 3) and clip.fps == 8
    assert (
        clip.metadata["prompt"] == "a red cat"
        and clip.metadata["seed"] == 42
        and clip.metadata["num_inference_steps"] == 2
    )


def test_random_seed_is_printed_and_reproduces(model, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["generate", "a blue dog", "--model", model, *QUICK]) == 0
    err, out = capsys.readouterr()[::-1]
    seed = int(err.split("seed: ")[1].split()[0])
    (written,) = list(tmp_path.glob("*.mp4"))
    assert written.name == f"a-blue-dog-{seed}.mp4" and f"(seed {seed})" in out
    assert main(["generate", "a blue dog", "--model", model, "--seed", str(seed), "-o", "again.mp4", *QUICK]) == 0
    assert (video.read(written).frames == video.read(tmp_path / "again.mp4").frames).all()


def test_several_videos_and_overwrite(model, tmp_path, capsys):
    out = tmp_path / "many.webm"
    args = ["generate", "a cat", "-o", str(out), "--model", model, "--seed", "5", "--num-videos", "2", *QUICK]
    assert main(args) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["many-1.webm", "many-2.webm"]
    assert [video.read(tmp_path / f"many-{i}.webm").metadata["seed"] for i in (1, 2)] == [5, 6]
    before = (tmp_path / "many-1.webm").read_bytes()
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert main([*args, "--overwrite", "--fps", "12"]) == 0
    assert video.read(tmp_path / "many-1.webm").fps == 12
    assert (tmp_path / "many-1.webm").read_bytes() != before


BAD = {
    "frames < 1": (["--num-frames", "0"], "num_frames: must be an integer from 1"),
    "height not multiple of 8": (["--height", "100"], "height: must be a multiple of 8"),
    "width too large": (["--width", "4096"], "width: must be"),
    "steps < 1": (["--num-inference-steps", "0"], "num_inference_steps: must be an integer from 1"),
    "nan guidance": (["--guidance-scale", "nan"], "guidance_scale: must be"),
    "negative guidance": (["--guidance-scale", "-2"], "guidance_scale: must be"),
    "unknown sampler": (["--sampler", "plms"], "sampler: must be one of ddim"),
    "not a number": (["--num-frames", "many"], "--num-frames/--frames: invalid int value: 'many'"),
    "bad extension": (["-o", "{tmp}/clip.avi"], ".avi"),
    "unwritable folder": (["-o", "/proc/clip.mp4"], "not writable"),
    "missing folder": (["-o", "{tmp}/missing/clip.mp4"], "missing"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_one_line_exit_2_no_file(model, tmp_path, capsys, case):
    extra, message = BAD[case]
    extra = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    base = ["generate", "a cat", "--model", model, "--seed", "1", "--num-inference-steps", "2", "--num-frames", "2"]
    base += ["--height", "32", "--width", "32"]
    if "-o" not in extra:
        base += ["-o", str(tmp_path / "clip.mp4")]
    assert main([*base, *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert list(tmp_path.iterdir()) == []


def test_empty_prompt(model, tmp_path, capsys):
    assert main(["generate", "  ", "--model", model, "-o", str(tmp_path / "x.mp4")]) == 2
    assert "prompt: is blank" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_during_sampling_leaves_no_file(model, tmp_path):
    out = tmp_path / "clip.mp4"
    cmd = [sys.executable, "-m", "cinematic", "generate", "a cat", "-o", str(out), "--model", model, "--seed", "1"]
    cmd += ["--num-inference-steps", "400", "--num-frames", "2", "--height", "32", "--width", "32"]
    # A job started in the background by a non-interactive shell inherits SIGINT as ignored, and Python then installs
    # no KeyboardInterrupt handler; give the child the default disposition, as a terminal's Ctrl-C would find it.
    process = subprocess.Popen(
        cmd,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    seen = []
    for line in process.stderr:  # the progress bar prints every tenth of the way in a non-terminal
        seen.append(line)
        if "sampling" in line:
            process.send_signal(signal.SIGINT)
            break
    rest = process.communicate(timeout=120)[1]
    assert process.returncode == 130, seen + [rest]
    assert "interrupted" in rest and "Traceback" not in rest
    assert list(Path(tmp_path).iterdir()) == []
