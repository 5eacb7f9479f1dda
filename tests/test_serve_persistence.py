"""Nothing is lost or done twice: ``kill -9`` of a real server mid-generation, and the store's rules one by one,
on both stores (``store``: SQLite in the data folder, or a PostgreSQL database, where a dead server's jobs wait for
their lease to run out)."""

from __future__ import annotations

import re
import sqlite3
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi", reason="the serve extra is not installed")

from cinematic import video  # noqa: E402
from cinematic.pipeline import Pipeline  # noqa: E402
from cinematic.serve.files import Files  # noqa: E402
from cinematic.serve.service import open_store  # noqa: E402
from cinematic.serve.store import JobStore, Params  # noqa: E402
from cinematic.settings import ModelFacts, Settings  # noqa: E402
from tests.serve_helpers import ServerProcess, wait_for, wait_status  # noqa: E402

JOBS = [
    ("a red circle moving left", 11),
    ("a green triangle moving right", 12),
    ("a blue square moving up", 13),
    ("a yellow circle moving down", 14),
]
STEPS = 20  # about two seconds a job on one thread: long enough to be killed in the middle of one
LEASE = 1.0  # seconds: a PostgreSQL store's dead holder loses its jobs this long after its last heartbeat


def job_statuses(data: Path, store: str | None) -> dict[str, str]:
    """The durable state, read from the database itself while no server runs."""
    if store is not None:
        import psycopg

        with psycopg.connect(store) as db:
            return dict(db.execute("SELECT id, status FROM cinematic_jobs").fetchall())
    with sqlite3.connect(f"file:{data / 'jobs.sqlite3'}?mode=ro", uri=True) as db:
        return dict(db.execute("SELECT id, status FROM jobs"))


def opened(folder: Path, store: str | None, lease: float = LEASE) -> JobStore:
    return open_store(folder, store, lease, max_attempts=3)


def died(store: JobStore, folder: Path, url: str | None) -> JobStore:
    """The process holding ``store`` dies (nothing is written, its heartbeat stops); a new one opens the store
    once a shared store's lease has run out."""
    store.close()
    if url is not None:
        time.sleep(LEASE * 1.5)
    return opened(folder, url)


def reference_frames(prompt: str, seed: int, folder: Path):
    """The same video made without a server or a crash, encoded and decoded the same way."""
    torch.set_num_threads(1)  # as the server's worker runs
    clip = Pipeline.from_pretrained("shapes")(prompt, steps=STEPS, seed=seed, progress=False)
    return video.read(clip.save(folder / f"reference-{seed}.mp4")).frames


def test_kill_9_during_a_generation_loses_nothing(tmp_path, store):
    data = tmp_path / "data"
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    shared = [] if store is None else ["--store", store, "--lease", "2"]
    server = ServerProcess(data, logs[0], *shared)
    try:
        with server.client() as client:
            ids = [
                client.post("/v1/videos", json={"prompt": p, "seed": s, "steps": STEPS}).json()["id"] for p, s in JOBS
            ]
            wait_status(client, ids[0], ("completed",), timeout=120)
            first_file = client.get(f"/v1/videos/{ids[0]}/content").content

            def second_is_midway() -> bool:
                job = client.get(f"/v1/videos/{ids[1]}").json()
                assert job["status"] in ("queued", "in_progress"), "the kill came too late"
                return job["status"] == "in_progress" and 0 < job["progress"] < 70

            wait_for(second_is_midway, timeout=120, every=0.02, what="the second job to be midway")
            server.kill()
    finally:
        server.stop()

    before = job_statuses(data, store)
    assert [before[i] for i in ids] == ["completed", "in_progress", "queued", "queued"]
    if store is not None:
        time.sleep(3)  # the lease runs out, so that the new server's start finds the job to requeue

    server = ServerProcess(data, logs[1], *shared)
    try:
        with server.client() as client:
            assert client.get(f"/v1/videos/{ids[0]}/content").content == first_file, "finished videos stay"
            done = [wait_status(client, i, ("completed", "failed"), timeout=180) for i in ids]
            assert [job["status"] for job in done] == ["completed"] * 4
            listed = [job["id"] for job in client.get("/v1/videos").json()["data"]]
            assert listed == ids[::-1], "no job lost, none duplicated"
            files = {i: client.get(f"/v1/videos/{i}/content").content for i in ids}
    finally:
        server.stop()

    text = [log.read_text() for log in logs]
    for i in ids:
        assert sum(t.count(f"completed {i} ") for t in text) == 1, f"{i} completed exactly once"
    assert re.search(rf"started {ids[1]} on cpu \(attempt 2,", text[1]), "the interrupted job ran again"
    assert "requeued 1 job(s) left running by a previous server" in text[1]
    assert sorted(p.name for p in (data / "videos").iterdir()) == sorted(f"{i}.mp4" for i in ids), "no temp files"

    for (prompt, seed), i in zip(JOBS, ids):
        served = tmp_path / f"served-{seed}.mp4"
        served.write_bytes(files[i])
        got = video.read(served)
        assert got.metadata["id"] == i and got.metadata["seed"] == seed
        reference = reference_frames(prompt, seed, tmp_path)
        assert torch.equal(torch.from_numpy(got.frames), torch.from_numpy(reference)), f"{i} differs from the library's"


def params(seed: int = 1) -> Params:
    settings = Settings(prompt="a cat", num_frames=2, height=32, width=32, num_inference_steps=2, seed=seed)
    shapes = ModelFacts(num_frames=16, height=32, width=32, fps=8, max_steps=1000, levels=2, sampler="ddim",
                        num_inference_steps=50, guidance_scale=9.0, timestep_scaling=10.0)  # fmt: skip
    return Params(settings.resolve(shapes), "shapes")


def test_a_file_renamed_into_place_before_the_commit_is_made_again(tmp_path, store):
    url, store = store, opened(tmp_path, store)
    files = Files(tmp_path / "videos")
    job = store.add(params(), max_queue=10)
    assert store.claim().id == job.id
    files.path(job.id).write_bytes(b"a complete file, but the crash came before the commit")
    (files.folder / f".{job.id}.mp4.1234.tmp").write_bytes(b"half a file")
    store = died(store, tmp_path, url)  # the process dies here

    assert store.recover(max_attempts=3) == ([job.id], [])
    if store.shared:  # other servers may be writing: their temp files and their jobs' files stay
        assert files.sweep(store.ids(), temp_files=False) == 0
    assert files.sweep(store.completed_ids()) == 2 and list(files.folder.iterdir()) == []
    again = store.claim()
    assert again.id == job.id and again.attempts == 2 and again.params == job.params
    store.close()


def test_a_job_that_keeps_killing_the_server_fails_instead_of_looping(tmp_path, store):
    url, store = store, opened(tmp_path, store)
    job = store.add(params(), max_queue=10)
    for attempt in (1, 2, 3):
        assert store.claim().attempts == attempt
        store = died(store, tmp_path, url)
        assert store.recover(max_attempts=3) == (([job.id], []) if attempt < 3 else ([], [job.id]))
    failed = store.get(job.id)
    assert failed.status == "failed" and "3 times" in failed.error and store.claim() is None
    store.close()


def test_cancel_and_complete_race_has_one_winner(tmp_path, store):
    store = opened(tmp_path, store, 60)
    a, b = store.add(params(1), max_queue=10), store.add(params(2), max_queue=10)
    store.claim(), store.claim()
    assert store.cancel(a.id) and not store.complete(a.id, 1.0)
    assert store.complete(b.id, 1.0) and not store.cancel(b.id) and not store.complete(b.id, 1.0)
    assert (store.get(a.id).status, store.get(b.id).status) == ("cancelled", "completed")
    store.close()


def test_concurrent_workers_never_claim_one_job_twice(tmp_path, store):
    # Two stores on PostgreSQL (two servers), one on SQLite (it has one server): four workers in all.
    # A long lease: a heartbeat slowed by a busy machine must not let a held job be claimed again here.
    stores = [opened(tmp_path, store, 60)] + ([opened(tmp_path, store, 60)] if store is not None else [])
    ids = {stores[0].add(params(i), max_queue=100).id for i in range(60)}
    claimed: list[str] = []

    def worker(store: JobStore) -> None:
        while (job := store.claim()) is not None:
            claimed.append(job.id)

    threads = [threading.Thread(target=worker, args=(stores[i % len(stores)],)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(claimed) == sorted(ids)
    for store in stores:
        store.close()
