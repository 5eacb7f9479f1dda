"""The ``cinematic train`` sub-command: flags for every :class:`TrainConfig` field, then ``train(config)``.

Defaults are read from ``TrainConfig`` itself, so the help text and the Python API cannot disagree. Importing this
module does not import torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any

from cinematic.train.config import (
    DEFAULT_PARTS,
    OPTIMIZERS,
    PARTS,
    PRECISIONS,
    SAVE_DTYPES,
    STAGES,
    TIMESTEP_SAMPLINGS,
    TrainConfig,
)

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}


def _option(group: Any, flag: str, help: str, dest: str | None = None, **kwargs: Any) -> None:
    """A flag whose value is only passed on when given; its help shows TrainConfig's default."""
    dest = dest or flag.lstrip("-").replace("-", "_")
    default = _DEFAULTS.get(dest)
    switch = kwargs.get("action") in ("store_true", "store_false")
    shown = f" (default {default})" if default not in (None, ()) and not switch else ""
    group.add_argument(flag, dest=dest, default=argparse.SUPPRESS, help=help + shown, **kwargs)


def add_train_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``train`` to the ``cinematic`` sub-commands; ``args.run(args)`` runs it."""
    parser = subparsers.add_parser(
        "train",
        help="train a model from scratch or fine-tune one: the VAE stage, then the UNet + text encoder stage",
        description="Train on the shapes generator or on captioned video files. Checkpoints in --out are models "
        "in cinematic's format (use them with --model); --resume continues a run exactly where it stopped.",
    )
    run = parser.add_argument_group("run")
    run.add_argument("--out", required=True, help="a new or empty folder for checkpoints, samples and the log")
    stage_help = "what trains: the autoencoder, or the UNet + text encoder on frozen VAE latents"
    _option(run, "--stage", stage_help, choices=STAGES)
    _option(run, "--resume", "continue from the newest checkpoint in --out (or start there)", action="store_true")
    _option(run, "--steps", "optimizer updates in the whole run", type=int)
    _option(run, "--stop-at", "end this invocation after this step, keeping the schedule of --steps", type=int)
    _option(run, "--seed", "seed of every random draw (data order, noise, timesteps, dropout, init)", type=int)
    _option(run, "--device", "cpu, cuda or cuda:N (default: cuda when available)")
    _option(run, "--quiet", "no progress line", action="store_false", dest="progress")

    start = parser.add_argument_group("model")
    _option(start, "--init", "start from this model (folder in any layout, bundled name or hub id)")
    _option(start, "--preset", "start from fresh weights: a preset name (tiny, full) or a ModelConfig .json")
    _option(start, "--vae", "use this model's (trained) VAE; the unet stage needs one when starting from a preset")
    _option(start, "--tokenizer", "a tokenizer folder (default: the init model's, or one trained on the captions)")
    _option(start, "--train", "what trains, '+'-joined: " + _parts_help(), dest="parts")

    lora = parser.add_argument_group("LoRA (train adapters on the UNet's attention of the --init model, nothing else)")
    _option(lora, "--lora", "train LoRA adapters of this rank; checkpoints hold the adapter", type=int, metavar="RANK")
    _option(lora, "--lora-alpha", "scale the adapters' update by alpha / rank (default: alpha = rank)", type=float)
    _option(lora, "--lora-targets", "which attention layers", choices=("spatial", "temporal", "both"))

    data = parser.add_argument_group("data")
    _option(data, "--data", "'shapes', or a captions .jsonl/.csv (path, caption; paths relative to it) or its folder")
    _option(data, "--frames", "frames per clip (default: the model's trained clip, else the data's)", type=int)
    _option(data, "--height", "clip height in pixels", type=int)
    _option(data, "--width", "clip width in pixels", type=int)
    _option(data, "--frame-stride", "take every n-th frame of a video file", type=int)
    _option(data, "--workers", "data-loading processes", type=int)

    opt = parser.add_argument_group("optimisation")
    _option(opt, "--batch-size", "clips per micro-batch", type=int)
    _option(opt, "--grad-accum", "micro-batches per update", type=int)
    _option(opt, "--lr", "peak learning rate (AdamW)", type=float)
    _option(opt, "--text-lr-scale", "the text encoder's learning rate as a fraction of --lr", type=float)
    _option(opt, "--warmup-steps", "linear warm-up, then cosine decay to zero", type=int)
    _option(opt, "--weight-decay", "AdamW weight decay", type=float)
    _option(opt, "--grad-clip", "max gradient norm; 0 turns clipping off", type=float)
    _option(opt, "--ema-decay", "EMA of the weights that is saved; 0 saves the raw weights", type=float)
    _option(opt, "--caption-dropout", "fraction of captions replaced by '' (for guidance)", type=float)
    _option(opt, "--timestep-sampling", "UNet stage: how training timesteps are drawn", choices=TIMESTEP_SAMPLINGS)
    _option(opt, "--timestep-mean", "logit-normal timesteps: mean of the normal draw", type=float)
    _option(opt, "--timestep-std", "logit-normal timesteps: its standard deviation", type=float)
    _option(opt, "--dropout", "UNet dropout while training (default: the model's)", type=float)
    _option(opt, "--kl-weight", "VAE stage: weight of the KL term", type=float)
    _option(opt, "--gradient-checkpointing", "recompute activations in the backward pass", action="store_true")
    _option(opt, "--precision", "autocast precision (default: bf16 on CUDA, fp32 elsewhere)", choices=PRECISIONS)
    _option(opt, "--optimizer", "adamw, or adamw8bit (bitsandbytes' 8-bit AdamW state; CUDA only)", choices=OPTIMIZERS)

    scale = parser.add_argument_group(
        "many processes (launch with: torchrun --nproc_per_node N -m cinematic train ...; DDP by default)"
    )
    _option(scale, "--fsdp", "shard weights, gradients and optimizer state over the ranks (FSDP2)", action="store_true")
    _option(scale, "--cache-latents", "compute VAE latents (and frozen text features) once into DIR, reuse them",
            metavar="DIR")  # fmt: skip

    out = parser.add_argument_group("checkpoints and samples")
    _option(out, "--save-every", "write a checkpoint every N steps", type=int)
    _option(out, "--keep-checkpoints", "keep only the newest N checkpoints (default: all)", type=int)
    _option(out, "--save-dtype", "precision of the saved model weights", choices=SAVE_DTYPES)
    _option(out, "--sample-every", "write sample videos every N steps (0: never)", type=int)
    _option(out, "--sample-prompts", "prompts of the sample videos (default: two training captions)", nargs="+")
    _option(out, "--sample-steps", "sampler steps of the sample videos", type=int)
    _option(out, "--sample-guidance", "guidance scale of the sample videos", type=float)
    parser.set_defaults(run=cmd_train)
    return parser


def _parts_help() -> str:
    return "; ".join(f"{stage} stage: {', '.join(PARTS[stage])} (default {DEFAULT_PARTS[stage]})" for stage in STAGES)


def cmd_train(args: argparse.Namespace) -> None:
    from cinematic.train.loop import train

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    path = train(TrainConfig(**{key: value for key, value in vars(args).items() if key in fields}))
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 wrote it and says so
        print(f"wrote {path}")
