"""Throughput of ``cinematic batch`` with the shapes model: videos per minute for 1 and 2 workers (one thread
each), on local worker processes and on Ray.

    python benchmarks/batch.py --json /tmp/batch.json                   # 40 videos per row, 50 steps: ~15 min
    python benchmarks/batch.py --videos 4 --steps 2 --workers 1        # a smoke run

Each row is one ``python -m cinematic batch`` command, run for real in a fresh process on a fresh output folder:
``wall`` is the command's whole time (start, model loads, every video, Ray's start where used) and ``per min`` the
videos it made per minute of it; ``steady`` is the rate once the workers are warm, from the manifest's per-video
seconds (the sum over workers of the time each spent making videos, divided by the number of workers). A row for
``--ray`` starts a local Ray cluster of its own (``ray.init``), so Ray's start-up is in its wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import machine, markdown_table

ROOT = Path(__file__).resolve().parent.parent
COLOURS, SHAPES, DIRECTIONS = ("red", "green", "blue", "yellow"), ("circle", "square", "triangle"), ("left", "up")


def prompts(path: Path, count: int) -> Path:
    captions = [f"a {c} {s} moving {d}" for c in COLOURS for s in SHAPES for d in DIRECTIONS]
    path.write_text("".join(json.dumps({"prompt": captions[i % len(captions)]}) + "\n" for i in range(count)))
    return path


def one_row(where: str, workers: int, count: int, steps: int, folder: Path) -> dict[str, Any]:
    out = folder / f"{where}-{workers}"
    argv = [sys.executable, "-m", "cinematic", "batch", str(prompts(folder / "prompts.jsonl", count)), "--out",
            str(out), "--workers", str(workers), "--threads", "1", "--num-inference-steps", str(steps)]  # fmt: skip
    if where == "ray":
        argv.append("--ray")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    manifest = out / "manifest.jsonl"
    rows = [json.loads(line) for line in manifest.read_text().splitlines()] if done.returncode == 0 else []
    if len(rows) != count or any(row["status"] != "done" for row in rows):
        raise RuntimeError(f"{' '.join(argv)} failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
    busy = sum(row["seconds"] for row in rows) / workers
    return {"where": where, "workers": workers, "videos": count, "steps": steps, "wall_s": round(wall, 1),
            "per_min": round(60 * count / wall, 1), "steady_per_min": round(60 * count / busy, 1)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--videos", type=int, default=40, help="videos per row (default 40)")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps per video (default 50, the model's)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts (default 1 2)")
    parser.add_argument("--where", nargs="+", choices=("local", "ray"), default=["local", "ray"])
    parser.add_argument("--json", type=Path, help="write the rows and the machine to this file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cinematic-batch-bench-") as folder:
        rows = [one_row(w, n, args.videos, args.steps, Path(folder)) for w in args.where for n in args.workers]
    headers = ["where", "workers", "videos", "steps", "wall (s)", "per min", "steady per min"]
    print(markdown_table(headers, [list(row.values()) for row in rows]))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
