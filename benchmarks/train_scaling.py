"""Data-parallel training throughput: steps per second of one small model on 1 and on N gloo processes (issue 26).

Each run is a real ``torchrun --standalone --nproc_per_node N -m cinematic train`` of the unet stage on the shapes
generator, one thread per process (``OMP_NUM_THREADS=1``), with the same per-process batch, so N processes do N
times the work of one per step (weak scaling). The first ``--warmup`` steps are left out; the rest are timed from
``log.jsonl``'s per-step seconds (data loading, forward, backward, the gradient all-reduce and the optimizer).

    .venv/bin/python benchmarks/train_scaling.py --processes 1 2 --steps 12 --json build/train-scaling.json
    .venv/bin/python benchmarks/train_scaling.py --steps 3 --warmup 1 --preset tiny     # smoke run, about a minute

The starting model is made first (one VAE-stage step of ``--preset``, in ``--workdir``). Numbers are only
meaningful on an otherwise idle machine with at least as many free cores as processes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine, markdown_table  # noqa: E402


def starting_model(workdir: Path, preset: str, size: int, frames: int) -> Path:
    """A complete model of ``preset`` (random UNet and text encoder, the VAE after one step)."""
    out = workdir / f"start-{preset}-{frames}x{size}"
    if (out / "model" / "model.json").is_file():
        return out / "model"
    shutil.rmtree(out, ignore_errors=True)
    command = ["train", "--out", str(out), "--stage", "vae", "--preset", preset, "--steps", "1", "--quiet"]
    command += ["--frames", str(frames), "--height", str(size), "--width", str(size)]
    subprocess.run(
        [sys.executable, "-m", "cinematic", *command], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    return out / "model"


def run(model: Path, processes: int, args: argparse.Namespace, out: Path) -> dict:
    """One torchrun launch of ``processes`` ranks; its per-step seconds after the warm-up."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    command += ["-m", "cinematic", "train", "--out", str(out), "--init", str(model), "--steps", str(args.steps)]
    command += ["--batch-size", str(args.batch_size), "--frames", str(args.frames), "--height", str(args.size)]
    command += ["--width", str(args.size), "--save-every", str(args.steps), "--quiet", "--device", "cpu"]
    began = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    wall = time.perf_counter() - began
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun with {processes} processes failed:\n{proc.stderr[-3000:]}")
    seconds = [json.loads(line)["seconds"] for line in (out / "log.jsonl").read_text().splitlines()]
    timed = seconds[args.warmup :]
    step = statistics.median(timed)
    return {
        "processes": processes,
        "global_batch": args.batch_size * processes,
        "timed_steps": len(timed),
        "s_per_step": round(step, 4),
        "steps_per_s": round(1.0 / step, 3),
        "clips_per_s": round(args.batch_size * processes / step, 3),
        "wall_s": round(wall, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the timing")
    parser.add_argument("--batch-size", type=int, default=2, help="clips per process per step")
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "cinematic-train-scaling")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.warmup >= args.steps:
        parser.error("--warmup must leave at least one timed step")
    args.workdir.mkdir(parents=True, exist_ok=True)
    model = starting_model(args.workdir, args.preset, args.size, args.frames)
    rows = []
    for processes in args.processes:
        out = args.workdir / f"run-{processes}"
        shutil.rmtree(out, ignore_errors=True)
        rows.append(run(model, processes, args, out))
    base = rows[0]["clips_per_s"]
    for row in rows:
        row["speed_up"] = round(row["clips_per_s"] / base, 2)
    headers = ["processes", "global batch", "s/step", "steps/s", "clips/s", "clips/s vs first", "wall s"]
    keys = ["processes", "global_batch", "s_per_step", "steps_per_s", "clips_per_s", "speed_up", "wall_s"]
    print(markdown_table(headers, [[row[k] for k in keys] for row in rows]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        settings = {k: v for k, v in vars(args).items() if k not in ("json", "workdir")}
        args.json.write_text(json.dumps({"machine": machine(), "settings": settings, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
