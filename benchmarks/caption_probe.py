"""Does a shapes model listen to each word of its caption? Two probes, for issue 4's direction problem.

    python benchmarks/caption_probe.py --model shapes
    python benchmarks/caption_probe.py --model build/shapes-recipe/unet/model --seeds 2

1. UNet sensitivity: for one noise input, the RMS difference of the UNet's output between captions that differ in
   one word (direction, colour, shape), at several timesteps. A word the model ignores gives ~0.
2. Same seed, four directions: "a <colour> <shape> moving left/right/up/down" from the same noise, each judged by
   ``cinematic.eval.judge``: a model that follows direction gives four different motions.

The numbers in docs/shapes.md (session 4) were measured this way.
"""

from __future__ import annotations

import argparse

import torch

DIRECTIONS = ("left", "right", "up", "down")
OBJECTS = ("red square", "blue circle", "green triangle")


def sensitivity(pipe, timesteps=(999, 900, 700, 500, 200)) -> None:
    model = pipe.model
    base = "a red square moving left"
    variants = {"direction": "a red square moving right", "colour": "a blue square moving left",
                "shape": "a red circle moving left"}  # fmt: skip
    d = model.config.defaults
    f = model.config.vae.downsample_factor
    latent = (4, model.config.vae.latent_channels, d.frames, d.height // f, d.width // f)
    x = torch.randn(latent, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        context = model.text_encoder(model.tokenizer([base, *variants.values()]))
        print("| t | output RMS | " + " | ".join(variants) + " |\n|---|---|" + "---|" * len(variants))
        for t in timesteps:
            steps = torch.full((x.shape[0],), float(t))
            outs = [model.unet(x, steps, c[None].expand(x.shape[0], -1, -1)) for c in context]
            diffs = [(out - outs[0]).pow(2).mean().sqrt().item() for out in outs[1:]]
            print(f"| {t} | {outs[0].pow(2).mean().sqrt():.3f} | " + " | ".join(f"{v:.4f}" for v in diffs) + " |")


def four_directions(pipe, seeds: int) -> None:
    from cinematic.eval.judge import judge_video
    from cinematic.eval.videos import generate

    right = total = 0
    for obj in OBJECTS:
        captions = [f"a {obj} moving {d}" for d in DIRECTIONS]
        for seed in range(seeds):
            row = []
            for caption, frames in zip(captions, generate(pipe, captions, seed)):
                verdict = judge_video(frames)
                asked = caption.rsplit(" ", 1)[1]
                right += verdict.direction == asked
                total += 1
                dx, dy = verdict.displacement or (float("nan"), float("nan"))
                row.append(f"{asked} -> {verdict.direction or '-'} ({dx:+.1f}, {dy:+.1f})")
            print(f"{obj}, seed {seed}: " + " | ".join(row))
    print(f"direction right in {right} of {total}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="shapes")
    parser.add_argument("--seeds", type=int, default=2, help="seeds of the four-directions probe (default 2)")
    args = parser.parse_args(argv)
    from cinematic.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(args.model)
    sensitivity(pipe)
    four_directions(pipe, args.seeds)


if __name__ == "__main__":
    main()
