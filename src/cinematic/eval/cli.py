"""The ``cinematic eval`` sub-command: generate shapes videos for every caption, judge them, print the table.

Video ``s`` of each caption is generated with seed ``s`` (counted from ``--first-seed``, 0), exactly as ``cinematic
generate CAPTION --seed s`` would make it, so any cell of the table can be reproduced by hand. Seeds other than the
reported ones (``--first-seed 100``) make a validation judge: choose settings or checkpoints on it, report on seeds 0
to 3. Captions are generated in batches (one sampler run for many captions), which on a CPU is several times faster
than one call per video. Importing this module does not import torch.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from cinematic.errors import CinematicError
from cinematic.settings import add_arguments, from_arguments, settings_from

DEFAULT_BATCH = 48  # captions per sampler run: all 48 shapes captions at once
# The settings an evaluation may change; the clip's size and length stay the model's.
EVAL_SETTINGS = (
    "num_inference_steps", "guidance_scale", "sampler", "eta", "timestep_scaling", "freeu", "freeinit",
    "cache_interval", "cache_depth", "guidance_stop",
)  # fmt: skip


def add_eval_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``eval`` to the ``cinematic`` sub-commands; ``args.run(args)`` runs it."""
    parser = subparsers.add_parser(
        "eval",
        help="judge a model on the shapes captions: colour, shape and direction accuracy, seen and held out",
        description="Generate --seeds videos for each shapes caption (the 40 seen in training and the 8 held "
        "out), judge each with cinematic.eval.judge, print a markdown table and optionally write JSON.",
    )
    parser.add_argument("--model", default="shapes", help="bundled name, model folder or hub id (default: shapes)")
    parser.add_argument("--seeds", type=int, default=4, help="videos per caption; video s uses seed s (default 4)")
    parser.add_argument(
        "--first-seed", type=int, default=0, metavar="S",
        help="the first video's seed; the others count up from it (default 0; another range, e.g. 100, makes a "
        "validation judge for choosing settings apart from the reported seeds)",
    )  # fmt: skip
    parser.add_argument("--captions", nargs="+", help="judge only these captions (default: all 48)")
    parser.add_argument("--batch", type=int, default=DEFAULT_BATCH, help="captions per sampler run (default 48)")
    parser.add_argument("--json", type=Path, help="write the report (and the settings) to this JSON file")
    parser.add_argument("--save-videos", type=Path, metavar="DIR", help="also write every video to DIR as .mp4")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, mps... (default: cuda if available)")
    parser.add_argument(
        "--lora", action="append", default=[], metavar="PATH[:SCALE]",
        help="judge the model with this LoRA applied (as cinematic generate's --lora; a few-step student such as "
        "shapes-turbo brings its sampler defaults); repeat for several",
    )  # fmt: skip
    settings = parser.add_argument_group("settings (as cinematic generate's; the defaults are its defaults)")
    add_arguments(settings, EVAL_SETTINGS)
    parser.set_defaults(run=cmd_eval)
    return parser


def _check_args(args: argparse.Namespace) -> tuple[list[str], dict[str, Any]]:
    """The captions to judge and the settings given, checked before the model loads."""
    from cinematic.data.shapes import ALL_CAPTIONS, parse_caption

    settings = from_arguments(args, EVAL_SETTINGS)
    settings_from({"prompt": "x", **settings})  # types and bounds: one line, exit 2
    for name in ("seeds", "batch"):
        if getattr(args, name) < 1:
            raise CinematicError(f"--{name} must be at least 1, not {getattr(args, name)}")
    if not 0 <= args.first_seed < 2**63 - args.seeds:
        raise CinematicError(f"--first-seed must be a seed from 0 to 2**63 - 1 - --seeds, not {args.first_seed}")
    captions = list(dict.fromkeys(args.captions or ALL_CAPTIONS))
    for caption in captions:
        parse_caption(caption)
    from cinematic.lora_loading import parse_spec

    args.loras = [parse_spec(spec) for spec in args.lora]
    return captions, settings


def cmd_eval(args: argparse.Namespace) -> None:
    import time

    import torch

    from cinematic.allocator import keep_freed_memory
    from cinematic.eval.judge import evaluate
    from cinematic.eval.videos import generate
    from cinematic.pipeline import Pipeline

    captions, settings = _check_args(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(device).type == "cpu":
        keep_freed_memory()  # process-wide, this command's to make: the steps reuse the heap (cinematic.allocator)
    pipe = Pipeline.from_pretrained(args.model, device=device, loras=args.loras)
    rows = [0]  # videos' worth of UNet work: each forward adds its batch (a guided pass of 48 videos adds 96)
    pipe.model.unet.register_forward_hook(lambda module, inputs, output: rows.__setitem__(0, rows[0] + len(inputs[0])))
    began = time.perf_counter()
    videos: dict[str, list] = {caption: [] for caption in captions}
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for first in range(0, len(captions), args.batch):
            chunk = captions[first : first + args.batch]
            for caption, frames in zip(chunk, generate(pipe, chunk, seed, **settings)):
                videos[caption].append(frames)
        print(f"seed {seed}: {len(captions)} videos, {time.perf_counter() - began:.0f} s so far", file=sys.stderr)
    seconds = time.perf_counter() - began
    if args.save_videos is not None:
        _save(videos, args.save_videos, pipe.model.config.defaults.fps, args.first_seed)
    report = evaluate(videos)
    print(report.table())
    count = len(captions) * args.seeds
    passes = rows[0] / count
    print(f"{count} videos in {seconds:.0f} s ({seconds / count:.2f} s per video, batched), {passes:g} UNet passes "
          "per video", file=sys.stderr)  # fmt: skip
    if args.json is not None:
        resolved = pipe.validate("x", **settings).settings.values()
        shown = {name: resolved[name] for name in EVAL_SETTINGS}
        took = round(seconds, 1)
        loras = [f"{path}:{scale:g}" for path, scale in args.loras]
        settings = {"model": str(args.model), "loras": loras, "seeds": args.seeds,
                    **({"first_seed": args.first_seed} if args.first_seed else {}), **shown, "device": device,
                    "seconds": took, "unet_passes_per_video": passes}  # fmt: skip
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"settings": settings, **report.to_json()}, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)


def _save(videos: dict[str, list], folder: Path, fps: float, first_seed: int) -> None:
    from cinematic import video

    folder.mkdir(parents=True, exist_ok=True)
    for caption, clips in videos.items():
        for seed, frames in enumerate(clips, start=first_seed):
            video.write(folder / f"{caption.replace(' ', '-')}-{seed}.mp4", frames, fps=fps)
