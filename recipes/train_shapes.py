"""The recipe behind the bundled ``shapes`` model: both training stages from scratch, on two CPU cores.

``scripts/train_shapes`` runs :func:`main` (``python -m recipes.train_shapes`` from the repository's root): the
VAE stage, the UNet + text encoder stage on its frozen latents, and a short decoder-only VAE run (see ``STAGES``),
all through :func:`cinematic.train.train` on the 40 training captions of ``cinematic.data.shapes`` (the 8 held-out
combinations are never rendered). The final EMA weights, in float16,
replace ``src/cinematic/assets/shapes/``, and ``recipe.json`` beside them records every parameter below and the wall
time of each run.

Sizes were chosen for time, not for headroom: 32x32 clips of 16 frames, a VAE with a 4x downsampling (8x8x4
latents), a two-level UNet of 48 and 64 channels and a two-layer, 64-wide text encoder. ``THREADS`` gives each run's
intra-op threads: the UNet run, which is most of the time, uses both cores (0.73-0.8 s a step with two threads on an
idle machine, about 1.2 s with one); the two VAE runs keep the one thread they were measured and made with (small
networks on a 2-core machine that is also doing something else run faster on one thread than on two, which then
wait on each other).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from cinematic.models.components import Defaults, ModelConfig, ScheduleConfig
from cinematic.models.text_encoder import TextEncoderConfig
from cinematic.models.unet3d_config import ShapesOptions, UNet3DConfig, UNetLevel
from cinematic.models.vae import VAEConfig
from cinematic.weights import BUNDLED_DIR

REPO = Path(__file__).resolve().parents[1]
DEST = BUNDLED_DIR / "shapes"
WORK = REPO / "build" / "shapes-recipe"
THREADS = {"vae": 1, "unet": 2, "decoder": 1}

MODEL = ModelConfig(
    unet=UNet3DConfig(
        # 48 channels at the 8x8 level, where corners are drawn (32 drew squares right in 16% of videos), in heads of
        # 16 (so three at 8x8 and four at 4x4; docs/shapes.md, session 11).
        levels=(UNetLevel(48, True), UNetLevel(64, True)),
        layers_per_block=1,
        head_dim=16,
        cross_attention_dim=64,
        norm_groups=8,
        transformer_in_heads=1,
        # Four additions to the published architecture, each off by default (docs/shapes.md says what each fixed):
        # the frame position in the temporal attention, coordinate planes into conv_in, the pooled caption in the
        # time embedding, and four caption-drawn layout planes: without the last, no run learned direction.
        shapes=ShapesOptions(frame_positions=True, coordinates=True, pooled_text=True, text_planes=4),
    ),
    # 8 positions: five-word captions need 7, and at CLIP's 77 the pad positions drowned every word but the colour.
    text_encoder=TextEncoderConfig(vocab_size=600, context_length=8, width=64, layers=2, heads=2, mlp_width=256),
    vae=VAEConfig(block_out_channels=(16, 32, 64), layers_per_block=1, norm_groups=8, latent_channels=4),
    # v-prediction on a zero terminal SNR schedule, sampled on trailing timesteps: the first sampling step sees pure
    # noise, as in training, so the layout comes from the caption and not from what the noise happens to hold.
    schedule=ScheduleConfig(prediction_type="v_prediction", zero_terminal_snr=True, timestep_spacing="trailing"),
    defaults=Defaults(frames=16, height=32, width=32, fps=8),
)

# Per-stage TrainConfig fields; everything not named keeps TrainConfig's default. Three runs: the VAE from scratch,
# the UNet and text encoder from scratch on its frozen latents, then the VAE's decoder alone (the latents the UNet
# learned stay exactly as they were). The third run is there because the first, at this length, decodes red and
# yellow objects alike (its latents tell them apart, its decoder does not yet use that); it writes the final model.
STAGES: dict[str, dict[str, Any]] = {
    "vae": {"steps": 1800, "batch_size": 2, "lr": 1.5e-3, "warmup_steps": 50, "ema_decay": 0.995, "save_dtype": "fp32"},
    "unet": {
        # The text encoder learns at a tenth of the UNet's rate: at the full rate it let the colour word take over
        # every position and erased the direction word (docs/shapes.md, sessions 4 and 8).
        "text_lr_scale": 0.1,
        "steps": 4500,
        "batch_size": 8,
        "lr": 1e-3,
        "warmup_steps": 100,
        "ema_decay": 0.998,
        "caption_dropout": 0.1,
        "save_dtype": "fp32",
    },
    "decoder": {
        "stage": "vae",
        "parts": "decoder",
        "steps": 1000,
        "batch_size": 2,
        "lr": 1e-3,
        "warmup_steps": 50,
        "ema_decay": 0.995,
        "save_dtype": "fp16",
    },
}
# The fraction of VAE-stage frames whose object is drawn in a random colour (see MixedFrames): at 0.25 the VAE reads
# purple (12 of 12 purple clips round-trip purple), which the purple LoRA of scripts/lora_purple needs; the models of
# sessions 1-9 used 0 and turned purple into blue.
OTHER_COLOURS = 0.25
COMMON: dict[str, Any] = {"data": "shapes", "frames": 16, "height": 32, "width": 32, "seed": 0, "save_every": 250}


class MixedFrames:
    """VAE-stage data: items shaped like clips, ``[3, F, H, W]``, whose F frames come from F consecutive items of
    the shapes dataset, so F different captions. The VAE sees frames one at a time, and a batch of two real clips
    shows it two colours: from such batches a first run learned only "warm" and "cold" (red and yellow decoded alike,
    green and blue alike) in 1250 steps. Mixed frames show every colour and shape in every batch.

    A fraction ``other_colours`` of the frames draw their object in a random saturated colour instead of the
    caption's, so the autoencoder learns colour in general, as a real one does, and not only the four the captions
    name: a fine-tune can then teach the model a new colour (the purple LoRA of ``recipes/lora_purple.py``).
    The recipe uses 0.25 (``OTHER_COLOURS``); at 0 the VAE knows the four colours only and decodes purple as blue."""

    def __init__(self, seed: int, frames: int = 16, size: int = 32, other_colours: float = 0.0):
        from cinematic.data.shapes import TRAIN_CAPTIONS, ShapesDataset

        self.clips = ShapesDataset(TRAIN_CAPTIONS, size=size, frames=frames, seed=seed)
        self.frames, self.captions, self.other_colours = frames, TRAIN_CAPTIONS, other_colours

    def __len__(self) -> int:
        return len(self.clips) // self.frames

    def __getitem__(self, index: int) -> dict[str, Any]:
        import torch

        first = index * self.frames
        rng = np.random.default_rng((self.clips.seed, index, 1))
        frames = []
        for f in range(self.frames):
            if rng.random() < self.other_colours:
                frames.append(self._recoloured(first + f, f, random_colour(rng)))
            else:
                frames.append(self.clips[first + f]["video"][:, f])  # [3,H,W]
        return {"video": torch.stack(frames, dim=1), "caption": ""}  # [3,F,H,W]

    def _recoloured(self, index: int, frame: int, rgb: np.ndarray) -> Any:
        """Frame ``frame`` of dataset item ``index`` with its object drawn in ``rgb``, as ``[3,H,W]`` in [-1, 1]."""
        import torch

        from cinematic.data.shapes import clip_params, coverage, item_seed

        params = clip_params(self.clips.caption(index), item_seed(self.clips.seed, index), self.clips.size, self.frames)
        alpha = coverage(params)[frame][..., None]  # H W 1
        background = np.asarray(params.background, dtype=np.float32)
        pixels = np.rint(background + alpha * (rgb - background)).transpose(2, 0, 1)
        return torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32) / np.float32(127.5) - np.float32(1))


def random_colour(rng: np.random.Generator) -> np.ndarray:
    """A saturated RGB colour of uniform hue (HSV saturation 0.55-0.8, value 0.7-0.9, like the palette's), float32."""
    import colorsys

    hue, saturation, value = rng.uniform(), rng.uniform(0.55, 0.8), rng.uniform(0.7, 0.9)
    return np.asarray(colorsys.hsv_to_rgb(hue, saturation, value), dtype=np.float32) * 255.0


def run_stage(stage: str, work: Path, resume: bool, **start: Any) -> tuple[Path, float]:
    """Train one stage into ``work/<stage>``; returns its final model folder and its wall time in seconds (summed
    over the invocations of a resumed run; a finished stage is not run again)."""
    from cinematic.train import TrainConfig, train

    out, timing = work / stage, work / f"{stage}-seconds.json"
    spent = json.loads(timing.read_text())["seconds"] if resume and timing.is_file() else 0.0
    if resume and (out / "model" / "model.json").is_file():
        return out / "model", spent
    import torch

    torch.set_num_threads(THREADS[stage])
    fields = {"stage": stage, **COMMON, **STAGES[stage], **start}
    config = TrainConfig(out=out, resume=resume, **fields)
    dataset = MixedFrames(config.seed, other_colours=OTHER_COLOURS) if config.stage == "vae" else None
    began = time.perf_counter()
    try:
        model = train(config, dataset=dataset)
    finally:
        spent += time.perf_counter() - began
        timing.write_text(json.dumps({"seconds": spent}) + "\n")
    return model, spent


def install(model: Path, dest: Path) -> None:
    """Replace ``dest`` with the model folder's files."""
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(model, dest)
    dest.chmod(0o755)  # the training run writes through a private temporary folder; a packaged asset is readable
    for path in dest.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Train the bundled shapes model from scratch (VAE, UNet + text, decoder)."
    )
    parser.add_argument("--work", type=Path, default=WORK, help=f"run folders (default {WORK})")
    parser.add_argument("--dest", type=Path, default=DEST, help=f"where the final model goes (default {DEST})")
    parser.add_argument("--resume", action="store_true", help="continue the runs in --work")
    parser.add_argument("--vae-steps", type=int, help=f"override the VAE stage's {STAGES['vae']['steps']} steps")
    parser.add_argument("--unet-steps", type=int, help=f"override the UNet stage's {STAGES['unet']['steps']} steps")
    parser.add_argument("--decoder-steps", type=int, help=f"override the decoder's {STAGES['decoder']['steps']} steps")
    args = parser.parse_args(argv)
    for stage, steps in (("vae", args.vae_steps), ("unet", args.unet_steps), ("decoder", args.decoder_steps)):
        if steps is not None:
            STAGES[stage] = {**STAGES[stage], "steps": steps, "warmup_steps": min(STAGES[stage]["warmup_steps"], steps)}

    import torch

    args.work.mkdir(parents=True, exist_ok=True)
    preset = args.work / "preset.json"
    preset.write_text(json.dumps(MODEL.to_dict(), indent=2) + "\n")

    seconds = {}
    vae_model, seconds["vae"] = run_stage("vae", args.work, args.resume, preset=str(preset))
    unet_model, seconds["unet"] = run_stage("unet", args.work, args.resume, preset=str(preset), vae=str(vae_model))
    final, seconds["decoder"] = run_stage("decoder", args.work, args.resume, init=str(unet_model))
    seconds["total"] = sum(seconds.values())
    print(", ".join(f"{k} {v / 60:.1f} min" for k, v in seconds.items()), file=sys.stderr)

    install(final, args.dest)
    recipe = {
        "command": "scripts/train_shapes",
        "threads": THREADS,
        "model": MODEL.to_dict(),
        "common": COMMON,
        "stages": STAGES,
        "other_colours": OTHER_COLOURS,
        "wall_seconds": {k: round(v, 1) for k, v in seconds.items()},
        "torch": torch.__version__,
    }
    (args.dest / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
    print(f"wrote {args.dest}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
