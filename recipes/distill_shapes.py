"""The recipe behind the bundled ``shapes-turbo`` LoRA: the 4-step student of the bundled shapes model.

``scripts/distill_shapes`` runs :func:`main`: ``cinematic distill --model shapes`` (printed, then run through the same
:class:`cinematic.train.config.DistillConfig`) on the shapes generator's 40 training captions, then installs the
final EMA adapter, its ``lora.json`` (the sampler settings it was made for) and a ``recipe.json`` recording every
parameter and the wall time into ``src/cinematic/assets/shapes-turbo/``, so that

    cinematic generate "a red circle moving left" --lora shapes-turbo

makes a video in 4 single-pass steps. Measure it with ``cinematic eval --lora shapes-turbo`` (docs/few-step.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from cinematic.weights import BUNDLED_DIR
from recipes.train_shapes import install

REPO = Path(__file__).resolve().parents[1]
DEST = BUNDLED_DIR / "shapes-turbo"
WORK = REPO / "build" / "shapes-turbo"
THREADS = 2

# DistillConfig fields; everything not named keeps its default (a rank-32 LoRA on every layer, which at the shapes
# model's 48 and 64 channels is close to full rank; a 256-wide guidance embedding; an EMA target of decay 0.95;
# timestep scaling 10; pseudo-Huber c = 0.001). Guidance is drawn around the teacher's default of 9 only, and the
# solver grid has 25 steps (one solver step spans 40 timesteps, so the consistency target travels the grid in half
# the hops of the default 50; 999, 759, 519 and 279, the 4-step sampler's timesteps, are on it). The lowest 7 solver
# steps (t <= 279, the 4-step sampler's last) are anchored to the teacher's own trajectory, and half the clips are
# the target network's one-step samples of their captions: the rounded shapes the sampler's later steps are given,
# which noised real clips never show the student (docs/few-step.md measures both). The run is short on purpose:
# judged on the validation seeds, students of this model are best after about 200 steps and get worse with longer
# training (docs/few-step.md), which is still unexplained.
SETTINGS: dict[str, Any] = {
    "data": "shapes",
    "steps": 200,
    "solver_steps": 25,
    "guidance_min": 7.0,
    "guidance_max": 11.0,
    "batch_size": 8,
    "lr": 5e-4,
    "warmup_steps": 50,
    "ema_decay": 0.99,
    "target_decay": 0.95,
    "anchor_steps": 7,
    "own_samples": 0.5,
    "save_every": 100,
    "seed": 0,
    "save_dtype": "fp16",
}


def command(out: Path, settings: dict[str, Any]) -> str:
    """The ``cinematic distill`` command line of ``settings``."""
    flags = [f"--{k.replace('_', '-')} {v}" for k, v in settings.items() if not k.startswith("guidance_")]
    if "guidance_min" in settings:
        flags.append(f"--guidance-range {settings['guidance_min']} {settings['guidance_max']}")
    return f"cinematic distill --model shapes --out {out} {' '.join(flags)}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=WORK, help=f"the run's folder (default {WORK})")
    parser.add_argument("--dest", type=Path, default=DEST, help=f"where the LoRA goes (default {DEST})")
    parser.add_argument("--resume", action="store_true", help="continue the run in --work")
    parser.add_argument("--steps", type=int, help=f"override the run's {SETTINGS['steps']} steps")
    args = parser.parse_args(argv)
    settings = dict(SETTINGS)
    if args.steps is not None:
        settings.update(steps=args.steps, warmup_steps=min(settings["warmup_steps"], args.steps))

    import torch

    from cinematic.train.config import DistillConfig
    from cinematic.train.distill import distill

    torch.set_num_threads(THREADS)
    run = args.work / "run"
    timing = args.work / "seconds.json"
    spent = json.loads(timing.read_text())["seconds"] if args.resume and timing.is_file() else 0.0
    print(command(run, settings), file=sys.stderr)
    args.work.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    try:
        final = distill(DistillConfig(run, init="shapes", resume=args.resume, **settings))
    finally:
        spent += time.perf_counter() - began
        timing.write_text(json.dumps({"seconds": spent}) + "\n")

    install(final, args.dest)  # OUT/model: the adapter and its lora.json, without the training state
    recipe = {
        "command": "scripts/distill_shapes",
        "equivalent": command(Path("build/shapes-turbo/run"), settings),
        "threads": THREADS,
        "settings": settings,
        "wall_seconds": round(spent, 1),
        "torch": torch.__version__,
    }
    (args.dest / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
    print(f"wrote {args.dest} ({spent / 60:.1f} min)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
