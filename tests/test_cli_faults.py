"""The CLI's faults from issue 23, each one line and exit 2 (or the signal's code), with no file left behind: a prompt
that is not UTF-8, a full disk, a device that does not exist or that this torch cannot use, and SIGTERM mid-write."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cinematic import video
from cinematic.cli import main
from cinematic.errors import CinematicError
from cinematic.settings import SettingError, settings_from

ROOT = Path(__file__).resolve().parent.parent
QUICK = ["--model", "shapes", "--seed", "1", "--num-inference-steps", "2", "--num-frames", "2"]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]), "PYTHONUNBUFFERED": "1"}


def one_line(err: str, *words: str) -> None:
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert all(word in err for word in words), err


def test_non_utf8_prompt_is_refused_before_generating(tmp_path):
    out = tmp_path / "clip.mp4"
    # The bytes a shell passes for $'a red \xff circle': Python keeps \xff as the lone surrogate U+DCFF.
    command = [sys.executable, "-m", "cinematic", "generate", b"a red \xff circle", "-o", str(out), *QUICK]
    done = subprocess.run(command, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120)
    assert done.returncode == 2
    one_line(done.stderr, "prompt:", "UTF-8", "0xff")
    assert list(tmp_path.iterdir()) == []


def test_the_python_api_refuses_text_that_is_not_utf8():
    for field in ("prompt", "negative_prompt"):
        with pytest.raises(SettingError, match=f"{field}: must be UTF-8 text, not '\\\\ud800' at character 3"):
            settings_from({"prompt": "ok", field: "a \ud800 b"})
    with pytest.raises(SettingError, match="prompt: must be UTF-8 text, not the byte 0xff at character 7"):
        settings_from({"prompt": "a red \udcff circle"})


def test_a_full_disk_is_one_line_and_leaves_no_file(tmp_path, capsys, monkeypatch):
    real_mux = video._mux

    def mux_until_full(tmp: Path, *args, **kwargs):
        real_mux(tmp, *args, **kwargs)  # the temporary file is there, then the disk fills
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(video, "_mux", mux_until_full)
    out = tmp_path / "clip.mp4"
    assert main(["generate", "a red circle", "-o", str(out), *QUICK]) == 2
    *progress, last = capsys.readouterr().err.splitlines(keepends=True)  # the sampling bar came first
    assert all(line.startswith("sampling ") for line in progress), progress
    one_line(last, f"cannot write {out}: No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_while_writing_frames_is_one_line_and_leaves_no_folder(tmp_path, monkeypatch):
    def png_until_full(rgb):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(video, "_png_bytes", png_until_full)
    with pytest.raises(CinematicError, match="No space left on device") as caught:
        video.write(tmp_path / "frames", np.zeros((2, 8, 8, 3), np.uint8))
    assert "\n" not in str(caught.value) and str(tmp_path / "frames") in str(caught.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "device, message",
    [
        ("bogus", "--device: unknown device 'bogus'; allowed: cpu, cuda, mps"),
        ("meta", "--device: cannot generate on 'meta'"),
        ("cuda:99" if torch.cuda.is_available() else "cuda", "; use --device cpu"),
    ],
)
def test_a_device_that_cannot_run_is_one_line(tmp_path, capsys, device, message):
    assert main(["generate", "a red circle", "-o", str(tmp_path / "clip.mp4"), "--device", device, *QUICK]) == 2
    one_line(capsys.readouterr().err, message)
    assert list(tmp_path.iterdir()) == []


# The CLI, with the mp4 muxer held up once the temporary file is complete, until a signal arrives.
HELD_WRITE = """
import sys, time
from cinematic import cli, video

real_mux = video._mux

def held_mux(tmp, *args, **kwargs):
    real_mux(tmp, *args, **kwargs)
    print("writing", tmp, flush=True)
    time.sleep(120)

video._mux = held_mux
sys.exit(cli.main(sys.argv[1:]))
"""


def test_sigterm_during_a_write_leaves_no_file(tmp_path):
    out = tmp_path / "clip.mp4"
    command = [sys.executable, "-c", HELD_WRITE, "generate", "a red circle", "-o", str(out), *QUICK]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
    line = process.stdout.readline()  # blocks until the temporary file is written
    assert line.startswith("writing "), (line, process.communicate(timeout=60))
    temporary = Path(line.split(" ", 1)[1].strip())
    assert temporary.is_file() and temporary.name.startswith(".clip.mp4.")
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, err
    assert "terminated; no output file was written" in err and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []


def test_main_restores_the_previous_sigterm_handler(tmp_path):
    def mine(signum, frame):
        pass

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        assert main(["generate", "a red circle", "--device", "bogus", *QUICK]) == 2
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)
