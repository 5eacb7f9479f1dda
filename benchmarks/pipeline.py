"""Seconds per denoising step: cinematic's pipeline against diffusers' TextToVideoSDPipeline, same weights, one run.

    python benchmarks/pipeline.py                      # the "small" config below, 8 frames at 64x64
    python benchmarks/pipeline.py --steps 10 --repeats 5 --json pipeline.json

Both load the same random-weight folder (written once by diffusers' own ``save_pretrained``) and run DDIM with
classifier-free guidance (batched, as both do by default) from the same seed. A step is timed as the whole sampling
call divided by its steps (text encoding included, VAE decode excluded: ``output_type="latent"`` for diffusers,
``Pipeline.sample`` for us). Runs alternate between the two, after one warm-up each, and the median is reported.
The config is a scaled-down copy of the real one (same block structure, a fifth of the width) so the networks
dominate, as they do at full size; the point is that the pipeline adds no overhead of its own.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from _common import machine, markdown_table, median

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def write_model(folder: Path) -> Path:
    """A diffusers-layout folder: the published block structure at 64 base channels, a 4-layer 256-wide text tower."""
    if (folder / "model_index.json").is_file():
        return folder
    from diffusers import AutoencoderKL, DDIMScheduler, TextToVideoSDPipeline, UNet3DConditionModel
    from tests.clip_vocab import write_tiny_clip_vocab
    from tests.factories import (
        SCHEDULER_CONFIG,
        randomize_zero_params,
        write_published_scheduler,
        write_published_tokenizer,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    vocab = write_tiny_clip_vocab(folder.parent / f"{folder.name}-vocab")
    tokenizer = CLIPTokenizer(str(vocab / "vocab.json"), str(vocab / "merges.txt"), pad_token="!")
    unet = UNet3DConditionModel(
        block_out_channels=(64, 128, 256, 256), cross_attention_dim=256, attention_head_dim=32, sample_size=16
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 64, 128, 128),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
    )
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
            num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu", pad_token_id=0,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        )
    )  # fmt: skip
    for module in (unet, vae, text):
        randomize_zero_params(module)
    scheduler = DDIMScheduler.from_config(SCHEDULER_CONFIG)
    pipe = TextToVideoSDPipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer, scheduler=scheduler)
    pipe.save_pretrained(folder)
    write_published_tokenizer(folder / "tokenizer")
    write_published_scheduler(folder / "scheduler")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/cinematic-bench"))
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=64, help="height and width in pixels")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from diffusers import TextToVideoSDPipeline

    from cinematic.allocator import keep_freed_memory
    from cinematic.pipeline import Pipeline

    folder = write_model(args.workdir / "pipeline-small")
    keep_freed_memory()  # as `cinematic generate` does on the CPU (both pipelines run in this process)
    ours = Pipeline.from_pretrained(folder)
    theirs = TextToVideoSDPipeline.from_pretrained(folder)
    theirs.set_progress_bar_config(disable=True)
    prompt = "a red cat riding a horse on the beach"
    settings = dict(num_frames=args.frames, height=args.size, width=args.size)

    def run_ours() -> float:
        request = ours.validate(prompt, steps=args.steps, seed=0, **settings)
        start = time.perf_counter()
        ours.sample(request, progress=False)
        return (time.perf_counter() - start) / args.steps

    def run_theirs() -> float:
        generator = torch.Generator("cpu").manual_seed(0)
        start = time.perf_counter()
        with torch.inference_mode():
            theirs(prompt, num_inference_steps=args.steps, generator=generator, output_type="latent", **settings)
        return (time.perf_counter() - start) / args.steps

    times: dict[str, list[float]] = {"cinematic": [], "diffusers": []}
    run_ours(), run_theirs()  # warm-up
    for _ in range(args.repeats):
        times["cinematic"].append(run_ours())
        times["diffusers"].append(run_theirs())
    ours_s, theirs_s = median(times["cinematic"]), median(times["diffusers"])
    rows = [
        ["cinematic", f"{ours_s:.3f}", f"{ours_s / theirs_s:.2f}x"],
        ["diffusers 0.42 TextToVideoSDPipeline", f"{theirs_s:.3f}", "1.00x"],
    ]
    info = machine()
    print(f"{args.frames} frames at {args.size}x{args.size}, DDIM {args.steps} steps, guidance 9 (batched), fp32")
    print(f"machine: {info['cpu']}, {info['cores']} cores, torch {info.get('torch')}, {args.threads} threads\n")
    print(markdown_table(["pipeline", "s/step (median)", "vs diffusers"], rows))
    if args.json:
        settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        args.json.write_text(json.dumps({"machine": info, "settings": settings, **times}, indent=2))


if __name__ == "__main__":
    main()
