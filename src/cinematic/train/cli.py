"""The ``cinematic train`` sub-command: flags for every :class:`TrainConfig` field, then ``train(config)``.

Defaults are read from ``TrainConfig`` itself, so the help text and the Python API cannot disagree. Importing this
module does not import torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
from collections.abc import Callable
from typing import Any

from cinematic.errors import CinematicError
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


def _defaults(config_class: type) -> dict[str, Any]:
    return {f.name: f.default for f in dataclasses.fields(config_class) if f.default is not dataclasses.MISSING}


_DEFAULTS = _defaults(TrainConfig)


def _option(
    group: Any, flag: str, help: str, dest: str | None = None, defaults: dict[str, Any] = _DEFAULTS, **kwargs: Any
) -> None:
    """A flag whose value is only passed on when given; its help shows the config's default (``defaults``:
    TrainConfig's, or DistillConfig's for ``cinematic distill``)."""
    dest = dest or flag.lstrip("-").replace("-", "_")
    default = defaults.get(dest)
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
    run = _run_group(parser, _option)
    stage_help = "what trains: the autoencoder, or the UNet + text encoder on frozen VAE latents"
    _option(run, "--stage", stage_help, choices=STAGES)

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

    _data_group(parser, _option)
    opt = _optimisation_group(parser, _option)
    _option(opt, "--text-lr-scale", "the text encoder's learning rate as a fraction of --lr", type=float)
    _option(opt, "--timestep-sampling", "UNet stage: how training timesteps are drawn", choices=TIMESTEP_SAMPLINGS)
    _option(opt, "--timestep-mean", "logit-normal timesteps: mean of the normal draw", type=float)
    _option(opt, "--timestep-std", "logit-normal timesteps: its standard deviation", type=float)
    _option(opt, "--dropout", "UNet dropout while training (default: the model's)", type=float)
    _option(opt, "--kl-weight", "VAE stage: weight of the KL term", type=float)

    scale = parser.add_argument_group(
        "many processes (launch with: torchrun --nproc_per_node N -m cinematic train ...; DDP by default)"
    )
    _option(scale, "--fsdp", "shard weights, gradients and optimizer state over the ranks (FSDP2)", action="store_true")
    _option(scale, "--cache-latents", "compute VAE latents (and frozen text features) once into DIR, reuse them",
            metavar="DIR")  # fmt: skip

    _checkpoint_group(parser, _option)
    parser.set_defaults(run=cmd_train)
    return parser


def _run_group(parser: argparse.ArgumentParser, option: Callable[..., None]) -> Any:
    run = parser.add_argument_group("run")
    run.add_argument("--out", required=True, help="a new or empty folder for checkpoints, samples and the log")
    option(run, "--resume", "continue from the newest checkpoint in --out (or start there)", action="store_true")
    option(run, "--steps", "optimizer updates in the whole run", type=int)
    option(run, "--stop-at", "end this invocation after this step, keeping the schedule of --steps", type=int)
    option(run, "--seed", "seed of every random draw (data order, noise, timesteps, dropout, init)", type=int)
    option(run, "--device", "cpu, cuda or cuda:N (default: cuda when available)")
    option(run, "--quiet", "no progress line", action="store_false", dest="progress")
    return run


def _data_group(parser: argparse.ArgumentParser, option: Callable[..., None]) -> None:
    data = parser.add_argument_group("data")
    option(data, "--data", "'shapes', or a captions .jsonl/.csv (path, caption; paths relative to it) or its folder")
    option(data, "--frames", "frames per clip (default: the model's trained clip, else the data's)", type=int)
    option(data, "--height", "clip height in pixels", type=int)
    option(data, "--width", "clip width in pixels", type=int)
    option(data, "--frame-stride", "take every n-th frame of a video file", type=int)
    option(data, "--workers", "data-loading processes", type=int)


def _optimisation_group(parser: argparse.ArgumentParser, option: Callable[..., None]) -> Any:
    """The optimiser's flags; the caller adds its stage's own to the returned group."""
    opt = parser.add_argument_group("optimisation")
    option(opt, "--batch-size", "clips per micro-batch", type=int)
    option(opt, "--grad-accum", "micro-batches per update", type=int)
    option(opt, "--lr", "peak learning rate (AdamW)", type=float)
    option(opt, "--warmup-steps", "linear warm-up, then cosine decay to zero", type=int)
    option(opt, "--weight-decay", "AdamW weight decay", type=float)
    option(opt, "--grad-clip", "max gradient norm; 0 turns clipping off", type=float)
    option(opt, "--ema-decay", "EMA of the weights that is saved; 0 saves the raw weights", type=float)
    option(opt, "--caption-dropout", "fraction of captions replaced by '' (for guidance)", type=float)
    option(opt, "--gradient-checkpointing", "recompute activations in the backward pass", action="store_true")
    option(opt, "--precision", "autocast precision (default: bf16 on CUDA, fp32 elsewhere)", choices=PRECISIONS)
    option(opt, "--optimizer", "adamw, or adamw8bit (bitsandbytes' 8-bit AdamW state; CUDA only)", choices=OPTIMIZERS)
    return opt


def _checkpoint_group(parser: argparse.ArgumentParser, option: Callable[..., None]) -> None:
    out = parser.add_argument_group("checkpoints and samples")
    option(out, "--save-every", "write a checkpoint every N steps", type=int)
    option(out, "--keep-checkpoints", "keep only the newest N checkpoints (default: all)", type=int)
    option(out, "--save-dtype", "precision of the saved model weights", choices=SAVE_DTYPES)
    option(out, "--sample-every", "write sample videos every N steps (0: never)", type=int)
    option(out, "--sample-prompts", "prompts of the sample videos (default: two training captions)", nargs="+")
    option(out, "--sample-steps", "sampler steps of the sample videos", type=int)
    option(out, "--sample-guidance", "guidance scale of the sample videos", type=float)


def _parts_help() -> str:
    return "; ".join(f"{stage} stage: {', '.join(PARTS[stage])} (default {DEFAULT_PARTS[stage]})" for stage in STAGES)


def cmd_train(args: argparse.Namespace) -> None:
    from cinematic.train.loop import train

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    path = train(TrainConfig(**{key: value for key, value in vars(args).items() if key in fields}))
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 wrote it and says so
        print(f"wrote {path}")


def add_distill_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``distill`` to the ``cinematic`` sub-commands; ``args.run(args)`` runs it. Its flags are ``train``'s
    where they mean the same, with DistillConfig's defaults."""
    from cinematic.train.config import DistillConfig

    option = functools.partial(_option, defaults=_defaults(DistillConfig))
    parser = subparsers.add_parser(
        "distill",
        help="make a few-step (4-step) student of a model by latent consistency distillation",
        description="Distil --model (the teacher) into a student that samples in a few single-pass steps: a LoRA "
        "(default) that 'cinematic generate --lora OUT/model' uses with the lcm sampler, or a full model (--full). "
        "Data, checkpoints, samples and --resume work as in cinematic train.",
    )
    run = _run_group(parser, option)
    run.add_argument("--model", dest="init", required=True, metavar="MODEL", help="the teacher: a folder in any "
                     "layout, bundled name or hub id")  # fmt: skip
    student = parser.add_argument_group("student")
    option(student, "--lora", "a LoRA of this rank on every linear layer and convolution of the UNet", type=int,
           metavar="RANK")  # fmt: skip
    option(student, "--lora-alpha", "scale the adapters' update by alpha / rank (default: alpha = rank)", type=float)
    student.add_argument("--full", action="store_true", help="train a full copy of the UNet instead of a LoRA")
    low, high = DistillConfig.guidance_min, DistillConfig.guidance_max
    option(student, "--guidance-range", f"the teacher's guidance scale is drawn from [MIN, MAX] per clip (default "
           f"{low} {high})", nargs=2, type=float, metavar=("MIN", "MAX"), dest="guidance_range")  # fmt: skip
    option(student, "--guidance-embedding", "width of the student's guidance embedding (0: none)", type=int)
    option(student, "--solver-steps", "the teacher's DDIM grid (one solver step = 1000 / N timesteps)", type=int)
    option(student, "--timestep-scaling", "of the consistency boundary scalings", type=float)
    option(student, "--huber-c", "c of the pseudo-Huber loss", type=float)
    option(student, "--target-decay", "the target is an EMA of the student with this decay (0: the student "
           "itself, as LCM-LoRA)", type=float)  # fmt: skip
    option(student, "--anchor-steps", "at the lowest N solver steps the target is the teacher's own DDIM run to the "
           "clean end, not the target network (0: LCM's one-step target everywhere)", type=int,
           metavar="N")  # fmt: skip
    option(student, "--own-samples", "replace this fraction of the clips by the target network's one-step sample of "
           "their caption, the kind of start the few-step sampler gives the student (default 0)", type=float,
           metavar="F")  # fmt: skip
    _data_group(parser, option)
    opt = _optimisation_group(parser, option)
    option(opt, "--cache-latents", "compute VAE latents and text features once into DIR, reuse them", metavar="DIR")
    _checkpoint_group(parser, option)
    parser.set_defaults(run=cmd_distill)
    return parser


def cmd_distill(args: argparse.Namespace) -> None:
    from cinematic.train.config import DistillConfig
    from cinematic.train.distill import distill

    values = vars(args)
    if values.pop("full", False):
        if "lora" in values or "lora_alpha" in values:
            raise CinematicError("--full trains the whole UNet; --lora and --lora-alpha are for a LoRA student")
        values["lora"] = None
    if "guidance_range" in values:
        values["guidance_min"], values["guidance_max"] = values.pop("guidance_range")
    fields = {f.name for f in dataclasses.fields(DistillConfig)}
    path = distill(DistillConfig(**{key: value for key, value in values.items() if key in fields}))
    if os.environ.get("RANK", "0") == "0":
        print(f"wrote {path}")
