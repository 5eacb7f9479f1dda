"""The ``cinematic eval`` sub-command: generate shapes videos for every caption, judge them, print the table.

Video ``s`` of each caption is generated with seed ``s``, exactly as ``cinematic generate CAPTION --seed s`` would
make it, so any cell of the table can be reproduced by hand. Captions are generated in batches (one sampler run
for many captions), which on a CPU is several times faster than one call per video. Importing this module does not
import torch.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from cinematic.errors import CinematicError

DEFAULT_BATCH = 48  # captions per sampler run: all 48 shapes captions at once


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
    parser.add_argument("--captions", nargs="+", help="judge only these captions (default: all 48)")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    parser.add_argument("--guidance", type=float, default=9.0, help="classifier-free guidance scale (default 9)")
    parser.add_argument("--sampler", default="ddim", help="ddim, dpmpp_2m, dpmpp_2m_karras, euler, euler_ancestral")
    parser.add_argument("--batch", type=int, default=DEFAULT_BATCH, help="captions per sampler run (default 48)")
    parser.add_argument("--json", type=Path, help="write the report (and the settings) to this JSON file")
    parser.add_argument("--save-videos", type=Path, metavar="DIR", help="also write every video to DIR as .mp4")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, mps... (default: cuda if available)")
    parser.add_argument("--freeu", action="store_true", help="sample with FreeU (see cinematic generate --freeu)")
    parser.add_argument("--freeinit", type=int, default=0, metavar="N", help="FreeInit iterations (default 0: off)")
    parser.add_argument("--cache-interval", type=int, default=1, metavar="N", help="feature caching (default 1: off)")
    parser.add_argument("--cache-depth", type=int, default=1, metavar="D", help="levels recomputed when caching")
    parser.add_argument("--guidance-stop", type=float, default=1.0, metavar="F", help="guidance truncation (1: off)")
    parser.set_defaults(run=cmd_eval)
    return parser


def _check_args(args: argparse.Namespace) -> list[str]:
    from cinematic.data.shapes import ALL_CAPTIONS, parse_caption
    from cinematic.pipeline import check_guidance, check_sampler

    check_sampler(args.sampler)
    check_guidance(args.guidance)
    for name in ("seeds", "steps", "batch"):
        if getattr(args, name) < 1:
            raise CinematicError(f"--{name} must be at least 1, not {getattr(args, name)}")
    captions = list(dict.fromkeys(args.captions or ALL_CAPTIONS))
    for caption in captions:
        parse_caption(caption)
    return captions


def cmd_eval(args: argparse.Namespace) -> None:
    import time

    import torch

    from cinematic.eval.judge import evaluate
    from cinematic.eval.videos import generate, same_seed_pipeline

    captions = _check_args(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = same_seed_pipeline(args.model, device)
    began = time.perf_counter()
    videos: dict[str, list] = {caption: [] for caption in captions}
    for seed in range(args.seeds):
        for first in range(0, len(captions), args.batch):
            chunk = captions[first : first + args.batch]
            made = generate(
                pipe, chunk, seed, args.steps, args.guidance, args.sampler, args.freeu, args.freeinit,
                cache_interval=args.cache_interval, cache_depth=args.cache_depth, guidance_stop=args.guidance_stop,
            )  # fmt: skip
            for caption, frames in zip(chunk, made):
                videos[caption].append(frames)
        print(f"seed {seed}: {len(captions)} videos, {time.perf_counter() - began:.0f} s so far", file=sys.stderr)
    seconds = time.perf_counter() - began
    if args.save_videos is not None:
        _save(videos, args.save_videos, pipe.model.config.defaults.fps)
    report = evaluate(videos)
    print(report.table())
    count = len(captions) * args.seeds
    print(f"{count} videos in {seconds:.0f} s ({seconds / count:.2f} s per video, batched)", file=sys.stderr)
    if args.json is not None:
        settings = {
            "model": str(args.model),
            "seeds": args.seeds,
            "steps": args.steps,
            "guidance": args.guidance,
            "sampler": args.sampler,
            **({"freeu": True} if args.freeu else {}),
            **({"freeinit": args.freeinit} if args.freeinit else {}),
            **(
                {"cache_interval": args.cache_interval, "cache_depth": args.cache_depth}
                if args.cache_interval > 1
                else {}
            ),
            **({"guidance_stop": args.guidance_stop} if args.guidance_stop < 1 else {}),
            "device": device,
            "seconds": round(seconds, 1),
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"settings": settings, **report.to_json()}, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)


def _save(videos: dict[str, list], folder: Path, fps: float) -> None:
    from cinematic import video

    folder.mkdir(parents=True, exist_ok=True)
    for caption, clips in videos.items():
        for seed, frames in enumerate(clips):
            video.write(folder / f"{caption.replace(' ', '-')}-{seed}.mp4", frames, fps=fps)
