"""Load test of ``cinematic serve``: N concurrent submissions from a second process, each then polled to the end.

    python benchmarks/serve_load.py --threads 1 --json /tmp/serve_load.json    # starts a server: 100 jobs, 10 steps
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --jobs 100     # or loads a running one (loopback)
    python benchmarks/serve_load.py --store postgres --threads 1               # the server on a PostgreSQL store
    python benchmarks/serve_load.py --store postgres --worker-nodes 2 --threads 1   # an API node and 2 worker nodes

All submissions go out at once (one connection each); every job is then followed by its own client, which polls
``GET /v1/videos/{id}`` every ``--poll`` seconds until the job finishes, as an app waiting for its video would. The
script checks that nothing is lost or done twice: every POST is accepted with a distinct id, every job completes,
the list endpoint holds each id exactly once, the server's generation histogram grew by exactly N (one completion
per job), and every mp4 downloads. It reports the latency of the POSTs and of the GETs made while jobs were
generating, prints a markdown table and can write JSON.

``--store postgres`` starts a throwaway PostgreSQL server (Debian's, as the tests do: ``tests/postgres.py``) and
serves from it; ``--store postgresql://...`` uses a database that exists. ``--worker-nodes N`` turns the started
server into an API node (``--role api``) beside N worker nodes (``--role worker``, one process each): a fleet on one
machine. A fleet's completions are counted from the worker nodes' logs (each logs ``completed <id>`` once per
completion), since no single server's histogram sees them all.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from _common import machine, markdown_table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FINISHED = ("completed", "failed", "cancelled")


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation between closest ranks."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


async def generation_totals(client: httpx.AsyncClient) -> tuple[int, float]:
    """The server's generation histogram: (completions counted, seconds summed) since it started."""
    text = (await client.get("/metrics")).text
    count = re.search(r"^cinematic_generation_seconds_count (\S+)$", text, re.M).group(1)
    total = re.search(r"^cinematic_generation_seconds_sum (\S+)$", text, re.M).group(1)
    return int(count), float(total)


async def follow(
    client: httpx.AsyncClient, body: dict[str, Any], poll: float, gets: list[float], errors: list[str]
) -> dict[str, Any]:
    """One client: submit, then poll the job until it finishes (a GET that fails in transport is counted and
    retried at the next poll, as an app would). Returns what it saw."""
    start = time.perf_counter()
    response = await client.post("/v1/videos", json=body)
    post_s = time.perf_counter() - start
    if response.status_code != 200:
        return {"accepted": False, "status": response.status_code, "post_s": post_s, "error": response.text}
    job = response.json()
    while job["status"] not in FINISHED:
        await asyncio.sleep(poll)
        sent = time.perf_counter()
        try:
            reply = await client.get(f"/v1/videos/{job['id']}")
        except httpx.TransportError as error:
            errors.append(f"{type(error).__name__}: {error}")
            continue
        gets.append(time.perf_counter() - sent)
        reply.raise_for_status()
        job = reply.json()
    return {"accepted": True, "id": job["id"], "status": job["status"], "post_s": post_s, "job": job}


async def logged_completions(logs: list[Path]) -> tuple[int, float]:
    """(completions, seconds summed) as the worker nodes logged them."""
    found = [re.findall(r"completed video_\S+ in (\S+) s", log.read_text()) for log in logs]
    seconds = [float(s) for each in found for s in each]
    return len(seconds), sum(seconds)


async def listed_ids(client: httpx.AsyncClient) -> list[str]:
    ids, after = [], None
    while True:
        page = (await client.get("/v1/videos", params={"limit": 100, **({"after": after} if after else {})})).json()
        ids += [job["id"] for job in page["data"]]
        if not page["has_more"]:
            return ids
        after = page["last_id"]


async def is_mp4(client: httpx.AsyncClient, job_id: str, gate: asyncio.Semaphore) -> bool:
    async with gate:
        response = await client.get(f"/v1/videos/{job_id}/content")
    return response.status_code == 200 and response.content[4:8] == b"ftyp"


async def run_load(url: str, args: argparse.Namespace, logs: list[Path] | None = None) -> dict[str, Any]:
    """The load test against ``url``; completions are counted from the worker nodes' ``logs`` when given."""
    limits = httpx.Limits(max_connections=args.jobs + 8, max_keepalive_connections=args.jobs + 8)
    totals = (lambda _: logged_completions(logs)) if logs else generation_totals
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        count_before, seconds_before = await totals(client)
        gets: list[float] = []
        errors: list[str] = []
        body = {"steps": args.steps, "frames": args.frames, "size": args.size, "sampler": args.sampler}
        start = time.perf_counter()
        results = await asyncio.gather(
            *(
                follow(client, {"prompt": f"a red circle moving left {i}", "seed": i, **body}, args.poll, gets, errors)
                for i in range(args.jobs)
            )
        )
        wall_s = time.perf_counter() - start
        accepted = [r for r in results if r["accepted"]]
        ids = [r["id"] for r in accepted]
        listed = await listed_ids(client)
        count_after, seconds_after = await totals(client)
        counted = count_after - count_before
        gate = asyncio.Semaphore(8)
        downloads = await asyncio.gather(*(is_mp4(client, i, gate) for i in ids))

    return {
        "url": url,
        "jobs": args.jobs,
        "settings": {**body, "model": "shapes"},
        "store": "sqlite" if args.store == "sqlite" else "postgresql",
        "worker_nodes": args.worker_nodes,
        "poll_s": args.poll,
        "accepted": len(accepted),
        "rejected": [r for r in results if not r["accepted"]][:5],
        "completed": sum(r["status"] == "completed" for r in accepted),
        "distinct_ids": len(set(ids)),
        "listed_once": sum(listed.count(i) == 1 for i in ids),
        "completions_counted": counted,
        "mp4_downloaded": sum(downloads),
        "get_transport_errors": errors,
        "wall_s": wall_s,
        "videos_per_min": 60 * len(ids) / wall_s,
        "post_ms": {
            "p50": 1000 * percentile([r["post_s"] for r in results], 50),
            "p99": 1000 * percentile([r["post_s"] for r in results], 99),
        },
        "get_while_generating_ms": {
            "n": len(gets),
            "p50": 1000 * percentile(gets, 50),
            "p99": 1000 * percentile(gets, 99),
            "max": 1000 * max(gets),
        },
        "generation_s_per_video": (seconds_after - seconds_before) / counted if counted else None,
    }


def verdict(result: dict[str, Any]) -> list[str]:
    """What went wrong, in words; empty when every job completed exactly once."""
    n, problems = result["jobs"], []
    for key in ("accepted", "completed", "distinct_ids", "listed_once", "completions_counted", "mp4_downloaded"):
        if result[key] != n:
            problems.append(f"{key}: {result[key]} of {n}")
    return problems


def table(result: dict[str, Any]) -> str:
    s, g, p = result["settings"], result["get_while_generating_ms"], result["post_ms"]
    rows = [
        [
            "jobs submitted at once / accepted / completed",
            f"{result['jobs']} / {result['accepted']} / {result['completed']}",
        ],
        [
            "lost / completed twice",
            f"{result['jobs'] - result['listed_once']} / {result['completions_counted'] - result['completed']}",
        ],
        ["settings", f"{s['model']}, {s['frames']} frames, {s['size']}, {s['steps']} steps, {s['sampler']}"],
        ["job store / worker nodes beside the API", f"{result['store']} / {result['worker_nodes'] or 'none'}"],
        ["POST /v1/videos p50 / p99 ms", f"{p['p50']:.1f} / {p['p99']:.1f}"],
        [
            f"GET /v1/videos/{{id}} while generating p50 / p99 ms ({g['n']} requests)",
            f"{g['p50']:.1f} / {g['p99']:.1f}",
        ],
        ["all 100 completed after s" if result["jobs"] == 100 else "all completed after s", f"{result['wall_s']:.1f}"],
        ["GET requests that failed in transport (retried)", str(len(result["get_transport_errors"]))],
        ["videos per minute", f"{result['videos_per_min']:.1f}"],
        ["generation s per video (server histogram, or worker nodes' logs)", f"{result['generation_s_per_video']:.2f}"],
    ]
    return markdown_table(["measure", "value"], rows)


def start_servers(folder: Path, args: argparse.Namespace, stack: contextlib.ExitStack, logs: list[Path]) -> str:
    """Start what ``args`` asks for (a database, a server, worker nodes), stopped by ``stack``; the server's URL.
    The worker nodes' logs are appended to ``logs``."""
    from tests.serve_helpers import ServerProcess

    store = args.store
    if store == "postgres":
        from tests.postgres import PostgresServer

        database = PostgresServer()
        stack.callback(database.stop)
        store = database.database()
    shared = [] if store == "sqlite" else ["--store", store]
    if args.worker_nodes:
        for i in range(args.worker_nodes):
            logs.append(folder / f"worker-{i}.log")
            worker = start_worker_node(folder / "data", store, logs[-1], args.threads)
            stack.callback(stop_process, worker)
        shared += ["--role", "api"]
    extra = ["--log-level", "warning", "--max-queue", str(args.jobs), *shared]
    server = ServerProcess(folder / "data", folder / "server.log", *extra, threads=args.threads)
    stack.callback(server.stop)
    return server.url


def start_worker_node(data: Path, store: str, log: Path, threads: int | None) -> subprocess.Popen:
    command = [sys.executable, "-m", "cinematic", "serve", "--role", "worker", "--data", str(data), "--store", store]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if threads is not None:
        command += ["--threads", str(threads)]
        env["OMP_NUM_THREADS"] = str(threads)
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    deadline = time.monotonic() + 120
    while "cinematic serve: worker node" not in log.read_text():
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"a worker node did not start:\n{log.read_text()}")
        time.sleep(0.1)
    return process


def stop_process(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGINT)
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="load a running server (loopback) instead of starting one")
    parser.add_argument("--jobs", type=int, default=100, help="concurrent submissions (default 100)")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps per job (default 10)")
    parser.add_argument("--frames", type=int, default=16, help="frames per job (default 16)")
    parser.add_argument("--size", default="32x32", help="WIDTHxHEIGHT (default 32x32, the shapes model's)")
    parser.add_argument("--sampler", default="ddim")
    parser.add_argument("--poll", type=float, default=1.0, help="seconds between one client's polls (default 1)")
    parser.add_argument("--threads", type=int, help="torch threads of the started server's worker (default torch's)")
    parser.add_argument(
        "--store", default="sqlite", help="sqlite (default), postgres (a throwaway server) or a postgresql:// URL"
    )
    parser.add_argument("--worker-nodes", type=int, default=0, help="worker processes beside an API node (a fleet)")
    parser.add_argument("--json", type=Path, help="write the result here")
    args = parser.parse_args()
    if args.worker_nodes and (args.url or args.store == "sqlite"):
        parser.error("--worker-nodes starts a fleet: it needs --store postgres (or a URL) and no --url")

    with tempfile.TemporaryDirectory(prefix="serve-load-") as folder, contextlib.ExitStack() as stack:
        logs: list[Path] = []
        url = args.url or start_servers(Path(folder), args, stack, logs)
        load_before = os.getloadavg()[0]
        result = asyncio.run(run_load(url, args, logs))
    # The machine may be shared: the load average (1 min, both cores counted) says how much else was running.
    result["load_average"] = {"before": load_before, "after": os.getloadavg()[0]}
    result["machine"] = machine()
    result["server_threads"] = args.threads
    problems = verdict(result)
    result["ok"] = not problems
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    for problem in problems:
        print(f"FAILED: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
