"""Load test of ``cinematic serve``: N concurrent submissions from a second process, each then polled to the end.

    python benchmarks/serve_load.py --threads 1 --json /tmp/serve_load.json    # starts a server: 100 jobs, 10 steps
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --jobs 100     # or loads a running one (loopback)

All submissions go out at once (one connection each); every job is then followed by its own client, which polls
``GET /v1/videos/{id}`` every ``--poll`` seconds until the job finishes, as an app waiting for its video would. The
script checks that nothing is lost or done twice: every POST is accepted with a distinct id, every job completes,
the list endpoint holds each id exactly once, the server's generation histogram grew by exactly N (one completion
per job), and every mp4 downloads. It reports the latency of the POSTs and of the GETs made while jobs were
generating, prints a markdown table and can write JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
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


async def run_load(url: str, args: argparse.Namespace) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=args.jobs + 8, max_keepalive_connections=args.jobs + 8)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        count_before, seconds_before = await generation_totals(client)
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
        count_after, seconds_after = await generation_totals(client)
        counted = count_after - count_before
        gate = asyncio.Semaphore(8)
        downloads = await asyncio.gather(*(is_mp4(client, i, gate) for i in ids))

    return {
        "url": url,
        "jobs": args.jobs,
        "settings": {**body, "model": "shapes"},
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
        ["POST /v1/videos p50 / p99 ms", f"{p['p50']:.1f} / {p['p99']:.1f}"],
        [
            f"GET /v1/videos/{{id}} while generating p50 / p99 ms ({g['n']} requests)",
            f"{g['p50']:.1f} / {g['p99']:.1f}",
        ],
        ["all 100 completed after s" if result["jobs"] == 100 else "all completed after s", f"{result['wall_s']:.1f}"],
        ["GET requests that failed in transport (retried)", str(len(result["get_transport_errors"]))],
        ["videos per minute", f"{result['videos_per_min']:.1f}"],
        ["generation s per video (server histogram)", f"{result['generation_s_per_video']:.2f}"],
    ]
    return markdown_table(["measure", "value"], rows)


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
    parser.add_argument("--json", type=Path, help="write the result here")
    args = parser.parse_args()

    server = None
    with tempfile.TemporaryDirectory(prefix="serve-load-") as folder:
        if args.url is None:
            from tests.serve_helpers import ServerProcess

            extra = ["--log-level", "warning", "--max-queue", str(args.jobs)]
            server = ServerProcess(Path(folder) / "data", Path(folder) / "server.log", *extra, threads=args.threads)
        load_before = os.getloadavg()[0]
        try:
            result = asyncio.run(run_load(args.url or server.url, args))
        finally:
            if server is not None:
                server.stop()
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
