"""The ``cinematic batch`` sub-command: a JSONL file of prompts in, one video per line and a manifest out.

Everything that is wrong with the command itself fails before any work, in one line with exit code 2: an
unreadable prompts file, an output folder that cannot be written, a bad default setting, ray missing, a Ray address
with no cluster, a model that does not load. What is wrong with one line is that line's failed row in the manifest;
the command then exits 1. Importing this module imports neither torch nor ray.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from cinematic.errors import CinematicError
from cinematic.settings import add_arguments, from_arguments, settings_from

FORMATS = {"mp4": ".mp4", "webm": ".webm", "gif": ".gif", "webp": ".webp", "png": ""}  # png: a folder of frames
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def add_batch_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``batch`` to the ``cinematic`` sub-commands; ``args.run(args)`` runs it."""
    parser = subparsers.add_parser(
        "batch",
        help="generate one video per line of a JSONL file, locally or on a Ray cluster, resumably",
        description="Each line of PROMPTS is a JSON object with a prompt and any setting (the names of generate's "
        "flags with underscores: num_inference_steps, seed...), an optional id and init_video or init_image. Each "
        "line makes DIR/ID.mp4 and a row of DIR/manifest.jsonl; running again skips what is done and retries what "
        "failed. The flags below set every line's defaults. See docs/batch.md.",
    )
    parser.add_argument("prompts", type=Path, metavar="PROMPTS.jsonl", help="one JSON object per line")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="the output folder (made if missing)")
    parser.add_argument("--model", default="shapes", help="bundled name, model folder or hub id (default: shapes)")
    parser.add_argument("--format", choices=FORMATS, default="mp4", help="the files' format (default mp4)")
    run = parser.add_argument_group("where it runs")
    run.add_argument("--workers", type=int, help="worker processes or Ray actors (default: one per GPU, else 1)")
    run.add_argument(
        "--threads", type=int, help="torch threads per worker (default: locally the cores split between the "
        "workers; on Ray 1)",
    )  # fmt: skip
    run.add_argument("--device", help="locally: cpu, cuda (every GPU, one worker each) or cuda:N (default: cuda if "
                     "available)")  # fmt: skip
    run.add_argument("--dtype", choices=sorted(DTYPES), help="weights precision (default: as generate's)")
    run.add_argument(
        "--ray", nargs="?", const="", metavar="auto|ADDRESS",
        help="run on Ray: alone, a running local cluster or a new one; auto: a running cluster; or HOST:PORT, "
        "ray://HOST:PORT (needs pip install 'cinematic[ray]')",
    )  # fmt: skip
    settings = parser.add_argument_group("settings: every line's defaults (a line's own values win)")
    add_arguments(settings)
    parser.set_defaults(run=cmd_batch)
    return parser


def _checked(args: argparse.Namespace) -> dict[str, Any]:
    """The default settings, checked, and the counts; one line each."""
    defaults = from_arguments(args)
    settings_from(defaults)
    for name in ("workers", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise CinematicError(f"--{name} must be at least 1, not {value}")
    return defaults


def _runner(args: argparse.Namespace, out: Path) -> Any:
    dtype = DTYPES[args.dtype] if args.dtype else None
    if args.ray is not None:  # each node finds the model itself: a hub id is fetched into each node's cache
        from cinematic.batch.on_ray import RayRunner

        return RayRunner(args.model, str(out), args.workers, args.threads or 1, dtype).results
    from cinematic.batch.local import LocalRunner, places
    from cinematic.weights import resolve

    model = str(resolve(args.model))  # a bad name fails here, in one line; a hub id is fetched once, not per worker

    device, gpus = args.device, 0
    if device is None or device == "cuda":
        import torch

        gpus = torch.cuda.device_count()
        device = device or ("cuda" if gpus else "cpu")
    if device == "cuda" and not gpus:
        raise CinematicError("--device cuda: no CUDA device is visible; use --device cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise CinematicError(f"--device: batch runs on cpu, cuda or cuda:N, not {device!r}")
    workers = args.workers or (gpus if device == "cuda" else 1)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    where = places(workers, device, gpus, args.threads or max(1, cores // workers))
    return LocalRunner(model, str(out), where, dtype).results


def cmd_batch(args: argparse.Namespace) -> int:
    from cinematic.batch.driver import run_batch
    from cinematic.batch.lines import read_tasks
    from cinematic.batch.manifest import prepare

    defaults = _checked(args)
    extension = FORMATS[args.format]
    seed = defaults.pop("seed", None)
    tasks = read_tasks(args.prompts, defaults, args.model, extension, seed)
    started = False
    if args.ray is not None:
        from cinematic.batch.on_ray import connect

        started = connect(args.ray or None)  # this command's to make and to end: it changes the process
    try:
        out = args.out.expanduser().absolute()
        runner = _runner(args, out)
        summary = run_batch(tasks, prepare(out, extension), runner)
    finally:
        if started:
            import ray

            ray.shutdown()
    print(f"{summary.done} done, {summary.skipped} done before, {summary.failed} failed: {summary.manifest}")
    for error in summary.errors[:10]:
        print(f"failed: {error}", file=sys.stderr)
    return 1 if summary.failed else 0
