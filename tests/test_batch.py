"""``cinematic batch`` on local worker processes: files, manifest, resuming, a killed driver, bad input.

The acceptance of issue 25: twelve lines with the shapes model (two of them bad) make ten files and two failed
rows; a second run makes nothing new; a driver killed with ``kill -9`` after its first video, run again, finishes
the rest without writing any file twice; every video's frames equal a single ``cinematic generate`` call's at the
seed the manifest records.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sys
import threading
import time

import pytest

from cinematic.batch.lines import default_id, drawn_seed, read_tasks
from cinematic.batch.manifest import read
from cinematic.cli import main
from tests.batch_helpers import (
    STEPS,
    batch_process,
    check_finished,
    expected_hashes,
    kill_when_first_video,
    rows,
    videos,
    write_prompts,
)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, str]:
    """One batch on two workers, and the frames hash of a ``cinematic generate`` call for each of its lines."""
    folder = tmp_path_factory.mktemp("reference")
    prompts, out = write_prompts(folder / "prompts.jsonl"), folder / "out"
    assert main(["batch", str(prompts), "--out", str(out), "--workers", "2", "--threads", "1", *STEPS]) == 1
    hashes = expected_hashes(tmp_path_factory.mktemp("generate"))
    check_finished(out, hashes)
    return {"out": out, "prompts": prompts, **hashes}


def test_ten_files_two_failed_rows_frames_equal_generate(reference):
    last = check_finished(reference["out"])
    assert last["red-square"]["settings"]["num_frames"] == 8 and last["000007"]["settings"]["num_inference_steps"] == 3
    assert last["000002"]["seed"] == 7 and last["000001"]["seed"] == drawn_seed("000001")
    assert last["000001"]["file"] == "000001.mp4" and last["000001"]["seconds"] > 0


def test_second_run_makes_nothing_new(reference, capsys):
    out = reference["out"]
    before = videos(out)
    assert main(["batch", str(reference["prompts"]), "--out", str(out), "--workers", "2", *STEPS]) == 1
    assert "12 lines: 10 done before, 0 to make, 2 failed" in capsys.readouterr().err
    assert videos(out) == before
    check_finished(out, {k: v for k, v in reference.items() if k not in ("out", "prompts")})


def test_killed_driver_resumes_without_writing_twice(reference, tmp_path):
    prompts, out = reference["prompts"], tmp_path / "out"
    kill_when_first_video(batch_process(prompts, out, "--workers", "1", "--threads", "1"), out)
    made = videos(out)
    assert 1 <= len(made) < 10, made
    assert main(["batch", str(prompts), "--out", str(out), "--threads", "1", *STEPS]) == 1
    assert {name: stamp for name, stamp in videos(out).items() if name in made} == made  # none written again
    check_finished(out, {k: v for k, v in reference.items() if k not in ("out", "prompts")})


def test_lines_ids_seeds_and_errors(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(
        b'"a red circle moving left"\n\n{"prompt": "x", "id": "a/b"}\n{"prompt": "y", "id": "same"}\n'
        b'{"prompt": "z", "id": "same"}\n[1]\n{"prompt": "w", "num_frames": 0}\n{"seed": 3}\n\xff\n'
        b'{"prompt": "v", "init_video": "clip.mp4"}\n'
    )
    tasks = read_tasks(path, {"guidance_scale": 5.0}, "shapes", ".mp4", seed=100)
    assert [t.line for t in tasks] == [1, 3, 4, 5, 6, 7, 8, 9, 10]
    first = tasks[0]
    assert first.id == default_id(1) == "000001" and first.file == "000001.mp4"
    assert first.settings == {"prompt": "a red circle moving left", "guidance_scale": 5.0, "seed": 100}
    errors = {t.line: t.error for t in tasks if t.error}
    assert errors[3].startswith("line 3: id must be 1 to 100 letters")
    assert errors[5] == "line 5: id 'same' is line 4's already"
    assert errors[6].startswith("line 6: must be a JSON object")
    assert errors[7].startswith("line 7: num_frames: must be an integer from 1")
    assert errors[8].startswith("line 8: prompt: is required")
    assert errors[9] == "line 9: not UTF-8 text (the byte 0xff at byte 1)"
    assert tasks[-1].pictures == {"init_video": str(tmp_path / "clip.mp4")} and tasks[-1].settings["seed"] == 109
    assert read_tasks(path, {}, "shapes", ".mp4")[0].settings["seed"] == drawn_seed("000001")


def test_manifest_reader_drops_a_torn_line(tmp_path):
    path = tmp_path / "manifest.jsonl"
    path.write_text('{"id": "a", "status": "failed"}\n{"id": "b", "status": "done"}\n{"id": "a", "status": "done"}\n'
                    '{"id": "c", "sta')  # fmt: skip
    assert {k: v["status"] for k, v in read(path).items()} == {"b": "done", "a": "done"}


def test_bad_lines_and_unreadable_init_video_fail_alone(tmp_path):
    prompts = tmp_path / "p.jsonl"
    lines = [{"prompt": "a red circle moving left", "init_video": "missing.mp4"}, {"prompt": "x", "height": 4096},
             {"prompt": "a blue square moving up", "id": "ok"}]  # fmt: skip
    prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert main(["batch", str(prompts), "--out", str(tmp_path / "out"), "--threads", "1", *STEPS]) == 1
    last = {row["line"]: row for row in rows(tmp_path / "out")}
    assert last[1]["status"] == "failed" and "missing.mp4" in last[1]["error"]
    assert last[2]["status"] == "failed" and last[2]["error"].startswith("line 2: height: must be")
    assert last[3]["status"] == "done" and (tmp_path / "out" / "ok.mp4").is_file()


BAD = {
    "missing prompts file": (["{tmp}/none.jsonl", "--out", "{tmp}/out"], "cannot read the prompts file"),
    "empty prompts file": (["{tmp}/empty.jsonl", "--out", "{tmp}/out"], "holds no lines"),
    "unwritable folder": (["{tmp}/p.jsonl", "--out", "/proc/out"], "cannot make the output folder /proc/out"),
    "folder is a file": (["{tmp}/p.jsonl", "--out", "{tmp}/p.jsonl"], "cannot make the output folder"),
    "bad default": (["{tmp}/p.jsonl", "--out", "{tmp}/out", "--num-frames", "0"], "num_frames: must be"),
    "no workers": (["{tmp}/p.jsonl", "--out", "{tmp}/out", "--workers", "0"], "--workers must be at least 1"),
    "unknown model": (["{tmp}/p.jsonl", "--out", "{tmp}/out", "--model", "{tmp}/nothing"], "no such model"),
    "ray address with no cluster": (
        ["{tmp}/p.jsonl", "--out", "{tmp}/out", "--ray", "127.0.0.1:9"],
        "no Ray cluster answers at 127.0.0.1:9",
    ),  # fmt: skip
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_one_line_exit_2(tmp_path, capsys, case):
    (tmp_path / "p.jsonl").write_text('{"prompt": "a red circle moving left"}\n')
    (tmp_path / "empty.jsonl").write_text("\n")
    args, message = BAD[case]
    assert main(["batch", *[a.format(tmp=tmp_path) for a in args], *STEPS]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not list((tmp_path / "out").glob("*")) if (tmp_path / "out").exists() else True


def test_without_ray_installed(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # what an import of a missing package meets
    (tmp_path / "p.jsonl").write_text('{"prompt": "a red circle moving left"}\n')
    assert main(["batch", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "out"), "--ray"]) == 2
    assert capsys.readouterr().err == 'error: --ray needs Ray, which is not installed: pip install "cinematic[ray]"\n'


def test_one_driver_per_folder(tmp_path, capsys):
    from cinematic.batch.manifest import locked

    (tmp_path / "p.jsonl").write_text('{"prompt": "a red circle moving left"}\n')
    (tmp_path / "out").mkdir()
    with locked(tmp_path / "out"):
        assert main(["batch", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "out")]) == 2
    assert "another cinematic batch is writing to" in capsys.readouterr().err


def test_a_killed_worker_process_is_replaced_and_its_line_made_once(reference, tmp_path):
    prompts, out, killed = reference["prompts"], tmp_path / "out", []

    def kill_a_worker() -> None:
        deadline = time.monotonic() + 120
        while not videos(out) and time.monotonic() < deadline:
            time.sleep(0.02)
        workers = [p for p in multiprocessing.active_children() if p.name.startswith("cinematic-batch-")]
        if workers:
            os.kill(workers[0].pid, signal.SIGKILL)
            killed.append(workers[0].name)

    killer = threading.Thread(target=kill_a_worker, daemon=True)
    killer.start()
    assert main(["batch", str(prompts), "--out", str(out), "--workers", "2", "--threads", "1", *STEPS]) == 1
    killer.join()
    assert killed, "no worker process was found to kill"
    check_finished(out, {k: v for k, v in reference.items() if k not in ("out", "prompts")})
