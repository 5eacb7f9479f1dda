"""Helpers shared by the batch tests: the 12-line prompts file, reference frames from ``cinematic generate``, the
state of an output folder (which files, written when), and the checks every finished batch must pass."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from cinematic import video
from cinematic.batch.lines import read_tasks
from cinematic.cli import main

ROOT = Path(__file__).resolve().parent.parent
STEPS = ["--num-inference-steps", "4"]  # every line's default: a video in a fraction of a second
# Ten good lines: some with their own id, seed or settings; line 4 is not JSON and line 9 names no setting.
LINES: list[Any] = [
    {"prompt": "a red circle moving left"},
    {"prompt": "a blue square moving up", "seed": 7},
    "a green triangle moving right",
    '{"prompt": "a yellow circle moving down", ',
    {"prompt": "a red square moving down", "id": "red-square", "num_frames": 8},
    {"prompt": "a blue circle moving right", "guidance_scale": 5},
    {"prompt": "a green square moving left", "steps": 3},
    {"prompt": "a yellow triangle moving up"},
    {"prompt": "a red triangle moving left", "stepz": 3},
    {"prompt": "a blue triangle moving down", "sampler": "dpmpp_2m"},
    {"prompt": "a green circle moving up", "id": "green-circle"},
    {"prompt": "a yellow square moving right", "seed": 123},
]
BAD_LINES = {4: "line 4: not valid JSON", 9: "line 9: stepz: is not a setting"}
GOOD = 10


def write_prompts(path: Path) -> Path:
    path.write_text("".join((line if isinstance(line, str) and line.startswith("{") else json.dumps(line)) + "\n"
                            for line in LINES))  # fmt: skip
    return path


def rows(out: Path) -> list[dict[str, Any]]:
    """Every row of the manifest, in order (a torn last line left out)."""
    found = []
    for line in (out / "manifest.jsonl").read_text().splitlines():
        try:
            found.append(json.loads(line))
        except ValueError:
            pass
    return found


def videos(out: Path) -> dict[str, tuple[int, int]]:
    """The finished videos of a folder: name -> (inode, mtime in ns); a file replaced or rewritten changes both."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.mp4")}


def frames_hash(path: Path) -> str:
    return hashlib.sha256(video.read(path).frames.tobytes()).hexdigest()


def generate_args(line: Any, seed: int) -> list[str]:
    """``cinematic generate`` arguments that make the video the batch made of ``line``."""
    values = {"prompt": line} if isinstance(line, str) else dict(line)
    args = [values.pop("prompt"), "--seed", str(seed), *STEPS]
    for name, value in values.items():
        if name not in ("id", "seed"):
            args += [f"--{name.replace('_', '-')}", str(value)]
    return args


def check_finished(out: Path, reference: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """Ten files and ten done rows, each id done exactly once; the two bad lines failed, naming their line; the
    frames equal ``reference`` (id -> frames hash) where given. Returns the last row of each id."""
    all_rows = rows(out)
    done = [row["id"] for row in all_rows if row["status"] == "done"]
    assert len(done) == len(set(done)) == GOOD, done
    last = {row["id"]: row for row in all_rows}
    assert len(last) == len(LINES)
    failed = {row["line"]: row["error"] for row in last.values() if row["status"] == "failed"}
    assert sorted(failed) == sorted(BAD_LINES)
    for number, start in BAD_LINES.items():
        assert failed[number].startswith(start) and "\n" not in failed[number], failed[number]
    assert sorted(videos(out)) == sorted(last[i]["file"] for i in done)
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    for task_id, expected in (reference or {}).items():
        assert frames_hash(out / last[task_id]["file"]) == expected, task_id
    return last


_EXPECTED: dict[str, str] = {}  # made once per test session: ten generate calls take a while on a busy machine


def expected_hashes(folder: Path) -> dict[str, str]:
    """The frames hash of a single ``cinematic generate`` call for each good line, at the seed its batch uses (the
    line's own, else the one drawn from its id, as the manifest rows of the tests show)."""
    if _EXPECTED:
        return dict(_EXPECTED)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers: on a busy machine two spinning threads can be 20 times slower
    try:
        for task in read_tasks(write_prompts(folder / "prompts.jsonl"), {}, "shapes", ".mp4"):
            if task.error is None:
                target = folder / task.file
                args = generate_args(LINES[task.line - 1], task.settings["seed"])
                assert main(["generate", *args, "-o", str(target)]) == 0
                _EXPECTED[task.id] = frames_hash(target)
    finally:
        torch.set_num_threads(threads)
    return dict(_EXPECTED)


def batch_process(prompts: Path, out: Path, *extra: str) -> subprocess.Popen:
    """``python -m cinematic batch`` in its own session (so its worker processes can be waited for)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    argv = [sys.executable, "-m", "cinematic", "batch", str(prompts), "--out", str(out), *STEPS, *extra]
    return subprocess.Popen(argv, env=env, start_new_session=True, stderr=subprocess.PIPE, text=True)


def kill_when_first_video(process: subprocess.Popen, out: Path, timeout: float = 120) -> None:
    """SIGKILL the driver once its first video is in place, then wait until its whole process group is gone."""
    deadline = time.monotonic() + timeout
    while not videos(out) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert process.poll() is None, f"the batch ended before a video appeared: {process.stderr.read()}"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    while time.monotonic() < deadline:
        if not living_members(process.pid):
            return
        time.sleep(0.05)
    raise AssertionError("the batch's worker processes outlived its driver")


def living_members(group: int) -> list[int]:
    """The processes of process group ``group`` that still run (zombies, dead and not yet reaped, left out)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == group:
            found.append(int(stat.parent.name))
    return found
