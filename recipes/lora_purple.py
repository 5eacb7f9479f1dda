"""The purple LoRA experiment (``scripts/lora_purple``): teach the bundled shapes model a colour it has never seen.

1. ``clips``: render shapes clips of purple objects (``data.shapes.EXTRA_PALETTE``), plus one clip of each of the
   40 training captions so the adapter does not unlearn the four colours, and write them as mp4 files with a
   ``captions.jsonl``: the same input a user's own clips would be.
2. ``train``: ``cinematic train --init shapes --data CLIPS/captions.jsonl --lora RANK ...`` (printed, then run
   through the same :class:`TrainConfig`).
3. ``eval``: generate the 12 purple captions with the base model and with the adapter, from the same seeds, and read
   them with the judge extended to purple (``judge_video(..., extra=True)``); also the 40 training captions with the
   adapter, to see what it costs the colours the model already knew.

Run on the CPU with one thread; ``--steps`` sets the run's length. ``scripts/lora_purple`` runs
``python -m recipes.lora_purple`` from the repository's root.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from cinematic.data.shapes import DIRECTIONS, SHAPES, TRAIN_CAPTIONS, caption_of, render_clip

PURPLE_CAPTIONS = tuple(caption_of("purple", s, d) for s in SHAPES for d in DIRECTIONS)


def write_clips(folder: Path, per_caption: int, seed: int = 1000) -> Path:
    """``folder/*.mp4`` and ``folder/captions.jsonl``: ``per_caption`` purple clips per purple caption and one clip
    per training caption (standard colours), 16 frames of 32x32 at 8 fps."""
    from cinematic import video

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    plan = [(c, i) for c in PURPLE_CAPTIONS for i in range(per_caption)] + [(c, 0) for c in TRAIN_CAPTIONS]
    for n, (caption, i) in enumerate(plan):
        name = f"{caption.replace(' ', '-')}-{i}.mp4"
        video.write(folder / name, render_clip(caption, seed + n, extra=True), fps=8)
        rows.append({"path": name, "caption": caption})
    captions = folder / "captions.jsonl"
    captions.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return captions


def judge(pipe, captions: tuple[str, ...], seeds: int, steps: int, loras=None) -> dict[str, float]:
    """Accuracy of colour, shape, direction and all three over ``seeds`` videos per caption."""
    from cinematic.eval.judge import judge_video, score
    from cinematic.eval.videos import generate
    from cinematic.lora_loading import loras_applied

    totals = {"colour": 0, "shape": 0, "direction": 0, "all": 0}
    count = 0
    with loras_applied(pipe.model.unet, loras):
        for seed in range(seeds):
            for first in range(0, len(captions), 12):
                chunk = captions[first : first + 12]
                for caption, frames in zip(chunk, generate(pipe, chunk, seed, num_inference_steps=steps)):
                    right = score(judge_video(frames, extra=True), caption, extra=True)
                    totals = {k: totals[k] + right[k] for k in totals}
                    count += 1
    return {k: round(v / count, 3) for k, v in totals.items()} | {"videos": count}


def vae_roundtrip(pipe, captions: tuple[str, ...], seeds: int) -> dict[str, float]:
    """The judge's accuracy on the VAE's reconstructions of rendered clips: the ceiling of what any UNet adapter
    can reach, since every generated video is a decoding of the VAE."""
    import torch

    from cinematic.eval.judge import judge_video, score

    right, count = {"colour": 0, "shape": 0, "direction": 0}, 0
    for seed in range(seeds):
        for caption in captions:
            clip = render_clip(caption, 5000 + seed, extra=True)  # F H W 3
            video = torch.from_numpy(clip).permute(3, 0, 1, 2)[None].float() / 127.5 - 1  # [1, 3, F, H, W]
            with torch.no_grad():
                latents = pipe.model.vae.encode_video(video, generator=torch.Generator().manual_seed(seed))
            verdict = score(judge_video(pipe.decode(latents)[0].numpy(), extra=True), caption, extra=True)
            right = {k: right[k] + verdict[k] for k in right}
            count += 1
    return {k: round(v / count, 3) for k, v in right.items()} | {"videos": count}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/lora-purple"))
    parser.add_argument("--model", default="shapes")
    parser.add_argument("--clips-per-caption", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--seeds", type=int, default=4, help="videos per caption in the evaluation")
    parser.add_argument("--eval-steps", type=int, default=25)
    parser.add_argument("--skip-train", action="store_true", help="evaluate the adapter already in --out")
    args = parser.parse_args(argv)

    import torch

    from cinematic.allocator import keep_freed_memory
    from cinematic.pipeline import Pipeline
    from cinematic.train import TrainConfig, train

    torch.set_num_threads(1)
    keep_freed_memory()  # as `cinematic generate` does on the CPU (cinematic.allocator)
    began = time.perf_counter()
    run = args.out / "run"
    if not args.skip_train:
        captions = write_clips(args.out / "clips", args.clips_per_caption)
        print(
            f"cinematic train --init {args.model} --data {captions} --out {run} --lora {args.rank} --steps "
            f"{args.steps} --batch-size {args.batch_size} --lr {args.lr} --warmup-steps 20 --save-every 100",
            file=sys.stderr,
        )
        config = TrainConfig(
            run, init=args.model, data=str(captions), lora=args.rank, steps=args.steps, batch_size=args.batch_size,
            lr=args.lr, warmup_steps=20, save_every=100, resume=True, ema_decay=0.99,
        )  # fmt: skip
        train(config)
    trained = time.perf_counter() - began
    pipe = Pipeline.from_pretrained(args.model)
    adapter = [(run / "model", 1.0)]
    results = {
        "model": args.model,
        "settings": vars(args) | {"out": str(args.out)},
        "train_seconds": round(trained, 1),
        "purple_vae_roundtrip": vae_roundtrip(pipe, PURPLE_CAPTIONS, 2),
        "purple_base": judge(pipe, PURPLE_CAPTIONS, args.seeds, args.eval_steps),
        "purple_lora": judge(pipe, PURPLE_CAPTIONS, args.seeds, args.eval_steps, adapter),
        "standard_base": judge(pipe, TRAIN_CAPTIONS, 1, args.eval_steps),
        "standard_lora": judge(pipe, TRAIN_CAPTIONS, 1, args.eval_steps, adapter),
        "seconds": round(time.perf_counter() - began, 1),
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
