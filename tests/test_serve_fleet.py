"""A fleet of servers on one PostgreSQL database: API and worker nodes as real processes, ``kill -9`` of a worker
mid-job, servers starting at once on an empty database, leases taken over, and a database that cannot be reached.

The database is a throwaway server of this test session (``tests/postgres.py``); without PostgreSQL these fail.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi", reason="the serve extra is not installed")

from cinematic import video  # noqa: E402
from cinematic.cli import main  # noqa: E402
from cinematic.pipeline import Pipeline  # noqa: E402
from cinematic.serve.files import Files  # noqa: E402
from cinematic.serve.metrics import Histogram  # noqa: E402
from cinematic.serve.pg_store import PostgresStore  # noqa: E402
from cinematic.serve.worker import Worker  # noqa: E402
from tests.serve_helpers import ROOT, LoggedProcess, ServerProcess, wait_for, wait_status  # noqa: E402
from tests.test_serve_faults import Hooked  # noqa: E402
from tests.test_serve_persistence import params  # noqa: E402

QUICK = {"steps": 3, "frames": 4}  # a fraction of a second on one thread
LONG_STEPS = 60  # seconds: the job a worker is killed in the middle of
LEASE = "2"


class WorkerProcess(LoggedProcess):
    """``cinematic serve --role worker`` in a child process, on one thread; its log goes to ``log``."""

    def __init__(self, data: Path, store: str, log: Path):
        command = [sys.executable, "-m", "cinematic", "serve", "--role", "worker", "--data", str(data)]
        command += ["--store", store, "--lease", LEASE, "--threads", "1"]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        self.log, self._log_file = log, open(log, "a")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(command, stdout=self._log_file, stderr=subprocess.STDOUT, env=env, cwd=ROOT)

    def wait_ready(self) -> None:
        def ready() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"the worker exited with {self.process.returncode}:\n{self.log.read_text()}")
            return "cinematic serve: worker node" in self.log.read_text()

        wait_for(ready, timeout=120, every=0.1, what=f"the worker to start (log: {self.log})")


def reference_frames(pipe: Pipeline, prompt: str, seed: int, steps: int, frames: int, folder: Path):
    """The video made without a server or a crash, encoded and decoded the same way."""
    torch.set_num_threads(1)  # as the workers run
    clip = pipe(prompt, steps=steps, frames=frames, seed=seed, progress=False)
    return video.read(clip.save(folder / f"reference-{seed}.mp4")).frames


def test_a_fleet_loses_nothing_when_a_worker_is_killed_mid_job(tmp_path, pg_url):
    data = tmp_path / "data"
    workers = [WorkerProcess(data, pg_url, tmp_path / f"worker-{i}.log") for i in range(2)]
    api = ServerProcess(data, tmp_path / "api.log", "--role", "api", "--store", pg_url, "--max-steps", "1000")
    try:
        for worker in workers:
            worker.wait_ready()
        with api.client() as client:
            assert client.get("/healthz").json()["workers"] == [], "an API node runs no worker"
            jobs = [("a blue square moving up", 100, LONG_STEPS, 8)]
            jobs += [("a red circle moving left", 101 + i, QUICK["steps"], QUICK["frames"]) for i in range(19)]
            ids = [
                client.post("/v1/videos", json={"prompt": p, "seed": s, "steps": n, "frames": f}).json()["id"]
                for p, s, n, f in jobs
            ]

            def long_job_midway() -> bool:  # progress comes from the worker node, through the database
                job = client.get(f"/v1/videos/{ids[0]}").json()
                assert job["status"] in ("queued", "in_progress"), "the kill came too late"
                return job["status"] == "in_progress" and 0 < job["progress"] < 60

            wait_for(long_job_midway, timeout=120, every=0.05, what="the long job to be midway")
            holder = next(w for w in workers if f"started {ids[0]} " in w.log.read_text())
            holder.kill()
            survivor = next(w for w in workers if w is not holder)
            done = [wait_status(client, i, ("completed", "failed", "cancelled"), timeout=300) for i in ids]
            assert [job["status"] for job in done] == ["completed"] * len(ids)
            listed = [job["id"] for job in client.get("/v1/videos", params={"limit": 100}).json()["data"]]
            assert listed == ids[::-1], "no job lost, none listed twice"
            served = {i: client.get(f"/v1/videos/{i}/content").content for i in ids}
            _cancel_from_the_api_node(client, survivor)
    finally:
        api.stop()
        for worker in workers:
            worker.stop()

    logs = [w.log.read_text() for w in workers]
    for i in ids:
        assert sum(text.count(f"completed {i} ") for text in logs) == 1, f"{i} completed exactly once"
    assert re.search(rf"started {ids[0]} on cpu \(attempt 2,", survivor.log.read_text()), "the lost job ran again"
    assert sorted(p.name for p in (data / "videos").iterdir()) == sorted(f"{i}.mp4" for i in ids)
    pipe = Pipeline.from_pretrained("shapes")
    for (prompt, seed, steps, frames), i in zip(jobs, ids):
        (tmp_path / f"served-{seed}.mp4").write_bytes(served[i])
        got = video.read(tmp_path / f"served-{seed}.mp4")
        assert got.metadata["id"] == i and got.metadata["seed"] == seed
        expected = reference_frames(pipe, prompt, seed, steps, frames, tmp_path)
        assert torch.equal(torch.from_numpy(got.frames), torch.from_numpy(expected)), f"{i} differs"


def _cancel_from_the_api_node(client, worker: WorkerProcess) -> None:
    """A job running on a worker node, cancelled through the API node: the worker lets it go and writes nothing."""
    job = client.post("/v1/videos", json={"prompt": "a green triangle", "steps": 1000, "frames": 8}).json()
    wait_for(lambda: client.get(f"/v1/videos/{job['id']}").json()["progress"] > 0, timeout=60, what="a step")
    assert client.delete(f"/v1/videos/{job['id']}").json()["status"] == "cancelled"
    wait_for(lambda: f"cancelled {job['id']}" in worker.log.read_text(), timeout=30, what="the worker to stop it")
    assert client.delete(f"/v1/videos/{job['id']}").json()["deleted"] is True


def test_servers_starting_at_once_on_an_empty_database_all_come_up(tmp_path, pg_url):
    def start(i: int) -> ServerProcess:
        return ServerProcess(tmp_path / "data", tmp_path / f"api-{i}.log", "--role", "api", "--store", pg_url)

    with ThreadPoolExecutor(2) as pool:
        servers = list(pool.map(start, range(2)))
    try:
        with servers[0].client() as first, servers[1].client() as second:
            too_many = first.post("/v1/videos", json={"prompt": "a red circle", "steps": 5000})
            assert too_many.status_code == 422, "an API node checks requests against the model's facts alone"
            assert too_many.json()["error"]["param"] == "steps"
            job = first.post("/v1/videos", json={"prompt": "a red circle", **QUICK}).json()
            assert second.get(f"/v1/videos/{job['id']}").json()["status"] == "queued", "one queue for both"
            assert second.delete(f"/v1/videos/{job['id']}").json()["status"] == "cancelled", "cancel from any node"
            assert first.get(f"/v1/videos/{job['id']}").json()["status"] == "cancelled"
    finally:
        for server in servers:
            server.stop()

    # And at the store itself, eight at once on another empty database: the advisory lock lets one make the tables.
    url = pg_url.rsplit("/", 1)[0] + "/postgres"
    import psycopg

    with psycopg.connect(url, autocommit=True) as db:
        db.execute("CREATE DATABASE test_eight_at_once")
    eight = url.rsplit("/", 1)[0] + "/test_eight_at_once"
    barrier = threading.Barrier(8)

    def open_at_once(_: int) -> PostgresStore:
        barrier.wait()
        return PostgresStore(eight)

    with ThreadPoolExecutor(8) as pool:
        stores = list(pool.map(open_at_once, range(8)))
    assert all(store.counts()["queued"] == 0 for store in stores)
    for store in stores:
        store.close()


def test_a_lease_that_runs_out_is_taken_over_and_completed_once(pg_url):
    paused, other = PostgresStore(pg_url, lease=2.0), PostgresStore(pg_url, lease=2.0)
    job = paused.add(params(), max_queue=10)
    assert paused.claim().attempts == 1
    time.sleep(1.0)
    assert other.claim() is None, "a live lease is not taken"
    paused.close()  # its heartbeat stops, as in a process paused or cut off from the database; it can still call
    time.sleep(3.0)
    taken = other.claim()
    assert taken.id == job.id and taken.attempts == 2 and other.holds(job.id)
    assert not paused.complete(job.id, 1.0), "the old holder cannot complete it"
    assert not paused.fail(job.id, "late") and other.get(job.id).status == "in_progress"
    time.sleep(3.0)  # the live holder's heartbeat keeps its lease
    assert other.claim() is None and other.get(job.id).status == "in_progress"
    other.report(job.id, 42)
    wait_for(lambda: other.get(job.id).progress == 42, timeout=5, what="the heartbeat to write the progress")
    assert other.complete(job.id, 1.0) and not other.complete(job.id, 1.0)
    assert other.get(job.id).status == "completed"
    # A cancel from another server: the holder's heartbeat finds it and lets the job go.
    second = other.add(params(2), max_queue=10)
    assert other.claim().id == second.id and paused.cancel(second.id)
    wait_for(lambda: not other.holds(second.id), timeout=5, what="the heartbeat to see the cancel")
    assert not other.complete(second.id, 1.0) and other.get(second.id).status == "cancelled"
    paused.close()  # the connections it opened since
    other.close()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["--store", "postgresql://nobody:s3cret@127.0.0.1:1/jobs"],
            r"cannot use the job store at postgresql://nobody:\*\*\*@127\.0\.0\.1:1/jobs: ",
        ),
        (["--store", "mysql://u:s3cret@h/db"], r"--store mysql://u:\*\*\*@h/db: must be sqlite .* or a postgresql://"),
        (["--role", "worker"], r"--role worker needs a store shared with other servers"),
        (["--role", "boss"], r"argument --role: invalid choice"),
    ],
)
def test_bad_fleet_settings_are_one_line(tmp_path, capsys, args, expected):
    assert main(["serve", "--data", str(tmp_path / "data"), "--port", "0", "--role", "api", *args]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and re.search(expected, err), err
    assert "s3cret" not in err and "Traceback" not in err


def test_a_worker_whose_job_was_taken_over_leaves_the_new_holders_file(tmp_path, pg_url):
    """A worker cut off from the database past its lease finishes anyway: its completion is refused, and the file
    (the same video, written by the worker that took the job over) stays with the completed job."""
    cut_off, other = PostgresStore(pg_url, lease=1.0), PostgresStore(pg_url, lease=60.0)
    files = Files(tmp_path / "videos")
    job = cut_off.add(params(), max_queue=10)
    taken_over = threading.Event()

    def take_over(step: int) -> None:
        if step == 0 and not taken_over.is_set():
            cut_off.close()  # the heartbeat stops: the lease runs out while this worker goes on
            taken = wait_for(other.claim, timeout=30, what="the lease to run out")
            files.path(taken.id).write_bytes(b"the same video, by the worker that took the job over")
            assert other.complete(taken.id, 1.0)
            taken_over.set()

    pipe = Hooked(Pipeline.from_pretrained("shapes"), take_over)
    worker = Worker("cpu", pipe, cut_off, files, Histogram())
    worker.start()
    try:
        wait_for(taken_over.is_set, timeout=60, what="the take-over")
        wait_for(lambda: not worker.busy, timeout=60, what="the first worker to finish")
    finally:
        worker.stop()
        worker.join(60)
    done = other.get(job.id)
    assert done.status == "completed" and done.attempts == 2 and files.path(job.id).is_file()
    cut_off.close()
    other.close()
