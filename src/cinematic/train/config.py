"""What a training run is: one frozen dataclass, checked on construction, with no heavy imports.

The CLI (``train/cli.py``) builds a :class:`TrainConfig` from its flags and the Python API takes one directly, so
every default lives here once.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cinematic.errors import CinematicError

STAGES = ("vae", "unet")
# What ``parts`` may name in each stage. "temporal" is the UNet's temporal layers alone (temp_convs,
# temp_attentions, transformer_in), "decoder" the VAE's decoder and post_quant_conv.
PARTS = {"vae": ("vae", "decoder"), "unet": ("unet", "temporal", "text")}
DEFAULT_PARTS = {"vae": "vae", "unet": "unet+text"}
PRECISIONS = ("bf16", "fp32")
TIMESTEP_SAMPLINGS = ("uniform", "logit-normal")
SAVE_DTYPES = ("fp32", "fp16", "bf16")
OPTIMIZERS = ("adamw", "adamw8bit")  # adamw8bit: bitsandbytes' 8-bit AdamW, CUDA only


@dataclass(frozen=True)
class TrainConfig:
    """One run of ``cinematic train``: where it writes, what it starts from, what it sees and how it optimises."""

    out: Path  # a new or empty folder, or the folder of a run to continue with ``resume``
    stage: str = "unet"  # "vae": the autoencoder alone; "unet": UNet and text encoder on frozen VAE latents
    # Where the weights come from: an existing model (any layout ``cinematic.weights.load`` reads), or a preset
    # name / ModelConfig JSON for a fresh random init. ``vae`` swaps in another model's (trained) VAE.
    init: str | None = None
    preset: str | None = None
    vae: str | None = None
    tokenizer: str | None = None  # a tokenizer folder; by default the init model's, or one trained on the captions
    # "shapes" (the procedural generator) or a captions file (JSONL or CSV with path and caption) or its folder.
    data: str = "shapes"
    frames: int | None = None  # None: the starting model's trained size, else the data's (shapes: 16 x 32 x 32)
    height: int | None = None
    width: int | None = None
    frame_stride: int = 1  # take every n-th frame of a video file
    steps: int = 1000  # optimizer updates; the learning-rate schedule spans them
    batch_size: int = 1
    grad_accum: int = 1  # micro-batches per update
    lr: float = 1e-4
    text_lr_scale: float = 1.0  # the text encoder's learning rate, as a fraction of ``lr`` (UNet stage)
    warmup_steps: int = 100  # linear warm-up, then cosine decay to zero at ``steps``
    weight_decay: float = 0.01
    adam_betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    ema_decay: float = 0.999  # 0 saves the raw weights; the decay warms up as (1 + n) / (10 + n)
    caption_dropout: float = 0.1  # fraction of captions replaced by "" (classifier-free guidance)
    # The UNet's dropout while training: both references train with 0.1 in the temporal convs. None keeps that;
    # 0 suits training from scratch on endless generated data, where nothing is overfitted and updates are scarce.
    dropout: float | None = None
    # UNet stage: how training timesteps are drawn. "uniform" over the schedule, or "logit-normal": t / T is the
    # sigmoid of a normal draw of ``timestep_mean`` and ``timestep_std`` (Esser et al. 2024, sec. 3.1), which puts
    # more of the updates on the middle noise levels, where the object's outline is decided, and fewer on both ends.
    timestep_sampling: str = "uniform"
    timestep_mean: float = 0.0
    timestep_std: float = 1.0
    kl_weight: float = 1e-6  # VAE stage: weight of the per-element KL against the L1 + L2 reconstruction
    parts: str | None = None  # what trains, "+"-joined from PARTS[stage]; None: DEFAULT_PARTS[stage]
    gradient_checkpointing: bool = False
    precision: str | None = None  # None: bf16 autocast on CUDA, fp32 elsewhere
    device: str | None = None  # None: cuda when available
    seed: int = 0
    save_every: int = 500
    keep_checkpoints: int | None = None  # None keeps every checkpoint; only the newest keeps its training state
    save_dtype: str = "fp32"
    sample_every: int = 0  # 0: no sample videos
    sample_prompts: tuple[str, ...] = ()  # empty: the first two captions of the data
    sample_steps: int = 25
    sample_guidance: float = 9.0
    resume: bool = False  # continue from the newest checkpoint in ``out`` (a fresh start when there is none)
    stop_at: int | None = None  # end this run after that step, keeping the schedule of ``steps`` (train in slices)
    workers: int = 0  # data-loading processes; 0 loads in the training process
    progress: bool = True  # a progress line on stderr
    # LoRA: train rank-``lora`` adapters on the UNet's attention projections (``lora_targets``: spatial, temporal or
    # both) and nothing else; checkpoints then hold the adapter (see ``models/lora_adapters.py``). None: train the
    # weights.
    lora: int | None = None
    lora_alpha: float | None = None  # the update is scaled by alpha / rank; None: alpha = rank
    lora_targets: str = "both"
    # Memory and scale (docs/training.md#many-processes). Under ``torchrun`` every process is one rank of a
    # data-parallel run; ``fsdp`` shards the trained networks' weights, gradients and optimizer state over the ranks
    # (PyTorch's FSDP2 ``fully_shard``) instead of replicating them (DDP).
    fsdp: bool = False
    # A folder of VAE latents (posterior mean and log-variance) and, when the text encoder is frozen, text features,
    # computed once per clip (split over the ranks) and reused by later epochs and runs. Each clip is then the
    # dataset's fixed ``dataset[i]`` (no random start frame).
    cache_latents: str | None = None
    optimizer: str = "adamw"

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        object.__setattr__(self, "sample_prompts", tuple(self.sample_prompts))
        object.__setattr__(self, "adam_betas", tuple(self.adam_betas))
        if self.stage not in STAGES:
            raise CinematicError(f"stage must be one of {', '.join(STAGES)}, not {self.stage!r}")
        if self.init is not None and self.preset is not None:
            raise CinematicError("give either an init model or a preset, not both")
        self._check_counts()
        self._check_rates()
        if self.precision not in (None, *PRECISIONS):
            raise CinematicError(f"precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if self.timestep_sampling not in TIMESTEP_SAMPLINGS:
            raise CinematicError(
                f"timestep sampling must be one of {', '.join(TIMESTEP_SAMPLINGS)}, not {self.timestep_sampling!r}"
            )
        for name in ("timestep_mean", "timestep_std"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise CinematicError(f"{name.replace('_', ' ')} must be a finite number, not {value!r}")
        if not self.timestep_std > 0:
            raise CinematicError(f"timestep std must be positive, not {self.timestep_std!r}")
        if self.save_dtype not in SAVE_DTYPES:
            raise CinematicError(f"save dtype must be one of {', '.join(SAVE_DTYPES)}, not {self.save_dtype!r}")
        if self.stop_at is not None and not 1 <= self.stop_at <= self.steps:
            raise CinematicError(f"stop_at must be a step from 1 to steps={self.steps}, not {self.stop_at}")
        self.trained_parts()  # raises on a bad ``parts``
        self._check_lora()
        self._check_scale()

    def _check_counts(self) -> None:
        positive = ("steps", "batch_size", "grad_accum", "frame_stride", "save_every", "sample_steps")
        at_least_zero = ("warmup_steps", "sample_every", "workers", "seed")
        optional = ("frames", "height", "width", "keep_checkpoints")
        for name in positive + at_least_zero + optional:
            value = getattr(self, name)
            if value is None and name in optional:
                continue
            low = 0 if name in at_least_zero else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise CinematicError(f"{name.replace('_', ' ')} must be an integer of at least {low}, not {value!r}")

    def _check_rates(self) -> None:
        for name in ("lr", "text_lr_scale", "weight_decay", "grad_clip", "kl_weight", "sample_guidance"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise CinematicError(f"{name.replace('_', ' ')} must be a finite number >= 0, not {value!r}")
        if not self.lr > 0:
            raise CinematicError(f"lr must be positive, not {self.lr!r}")
        for name in ("ema_decay", "caption_dropout", "dropout"):
            value = getattr(self, name)
            if value is None and name == "dropout":
                continue
            if not isinstance(value, int | float) or not 0 <= value < 1:
                raise CinematicError(f"{name.replace('_', ' ')} must be a number in [0, 1), not {value!r}")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise CinematicError(f"adam betas must be two numbers in [0, 1), not {self.adam_betas!r}")

    def _check_lora(self) -> None:
        if self.lora is None:
            if self.lora_alpha is not None or self.lora_targets != type(self).lora_targets:  # not the default
                raise CinematicError("--lora-alpha and --lora-targets need --lora RANK")
            return
        from cinematic.models.lora_adapters import LoRAConfig

        LoRAConfig(self.lora, self.lora_alpha, self.lora_targets)  # raises on a bad rank, alpha or targets
        if self.stage != "unet" or self.init is None or self.parts is not None:
            raise CinematicError("--lora trains adapters on the UNet of a model: give --init MODEL, and no --train or "
                                 "--stage vae")  # fmt: skip

    def _check_scale(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise CinematicError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, not {self.optimizer!r}")
        if self.fsdp and self.lora is not None:
            raise CinematicError("--fsdp shards full fine-tunes; a LoRA adapter is small enough for DDP (the default)")
        if self.fsdp and (self.stage != "unet" or self.sample_every):
            raise CinematicError("--fsdp shards the unet stage's networks, without sample videos during training "
                                 "(--sample-every 0; sample from the checkpoints)")  # fmt: skip
        if self.cache_latents is not None and self.stage != "unet":
            raise CinematicError("--cache-latents caches the VAE latents that the unet stage trains on; the vae "
                                 "stage trains the VAE itself")  # fmt: skip

    def distill_settings(self) -> dict[str, Any] | None:
        """The distillation's own settings (``train/distill.py``); None for a training run."""
        return None

    def lora_config(self):
        """The :class:`cinematic.models.lora_adapters.LoRAConfig` of a LoRA run (None otherwise)."""
        from cinematic.models.lora_adapters import LoRAConfig

        return None if self.lora is None else LoRAConfig(self.lora, self.lora_alpha, self.lora_targets)

    def trained_parts(self) -> frozenset[str]:
        """The parts that train, validated: e.g. ``{"unet", "text"}`` or ``{"temporal"}``."""
        spec = self.parts or DEFAULT_PARTS[self.stage]
        parts = frozenset(p.strip() for p in spec.split("+"))
        allowed = PARTS[self.stage]
        unknown = sorted(parts - set(allowed))
        if unknown or not parts:
            raise CinematicError(
                f"cannot train {spec!r} in the {self.stage} stage: choose parts joined by '+' from {', '.join(allowed)}"
            )
        if {"unet", "temporal"} <= parts or {"vae", "decoder"} <= parts:
            raise CinematicError(f"{spec!r} names a network and a part of it; name one of them")
        return parts

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["out"] = str(self.out)
        return data


FEW_STEPS = 4  # the steps a student is made for and sampled with by default (T2V-Turbo's and MCM's)


@dataclass(frozen=True)
class DistillConfig(TrainConfig):
    """One ``cinematic distill`` run: a :class:`TrainConfig` whose ``init`` is the teacher, plus the distillation's
    own settings. Defaults that differ from ``train``'s: a rank-32 LoRA on every layer, no caption dropout, no UNet
    dropout (the teacher's passes and the target's must see the network the student trains), 4-step samples."""

    lora: int | None = 32  # None: the student is a full copy of the teacher's UNet
    lora_targets: str = "all"
    caption_dropout: float = 0.0
    dropout: float | None = 0.0
    ema_decay: float = 0.995
    sample_steps: int = FEW_STEPS
    guidance_min: float = 5.0  # the teacher's guidance scale w is drawn uniformly from [min, max] per clip
    guidance_max: float = 15.0
    guidance_embedding: int = 256  # width of the student's guidance embedding; 0: none (w is then not an input)
    solver_steps: int = 50  # the teacher's DDIM grid; one solver step spans num_train_timesteps / solver_steps
    timestep_scaling: float = 10.0  # of the boundary scalings (10: T2V-Turbo and LCM; 4: MCM)
    huber_c: float = 0.001  # the pseudo-Huber loss's c
    target_decay: float = 0.95  # the target is an EMA of the student with this decay; 0: the student itself
    anchor_steps: int = 0  # at the lowest this many solver steps the target is the teacher's own DDIM run to the end
    own_samples: float = 0.0  # this fraction of the clips is replaced by the target network's one-step sample

    def __post_init__(self) -> None:
        if self.init is None:
            raise CinematicError("distill needs a teacher: give the model to distil (--model)")
        if self.stage != "unet":
            raise CinematicError("distill trains the UNet: the stage is unet")
        if self.lora is None and self.parts is None:
            object.__setattr__(self, "parts", "unet")
        if self.lora is None and self.parts != "unet":
            raise CinematicError(f"a full student trains the whole UNet, not {self.parts!r}")
        if self.fsdp:
            raise CinematicError("--fsdp is not supported by distill: the teacher and the target are whole copies")
        super().__post_init__()
        for name in ("guidance_min", "guidance_max", "timestep_scaling", "huber_c"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise CinematicError(f"{name.replace('_', ' ')} must be a finite number >= 0, not {value!r}")
        if self.guidance_min > self.guidance_max:
            raise CinematicError(f"the guidance range must be MIN MAX with MIN <= MAX, not {self.guidance_min} "
                                 f"{self.guidance_max}")  # fmt: skip
        if not self.timestep_scaling > 0:
            raise CinematicError(f"timestep scaling must be positive, not {self.timestep_scaling!r}")
        for name, low, high in (
            ("guidance_embedding", 0, 4096),
            ("solver_steps", 1, 1000),
            ("anchor_steps", 0, self.solver_steps if isinstance(self.solver_steps, int) else 0),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise CinematicError(f"{name.replace('_', ' ')} must be an integer from {low} to {high}, not {value!r}")
        if (
            isinstance(self.own_samples, bool)
            or not isinstance(self.own_samples, int | float)
            or not 0 <= self.own_samples <= 1
        ):
            raise CinematicError(f"own samples must be a fraction in [0, 1], not {self.own_samples!r}")
        if not isinstance(self.target_decay, int | float) or not 0 <= self.target_decay < 1:
            raise CinematicError(f"target decay must be a number in [0, 1), not {self.target_decay!r}")

    def distill_settings(self) -> dict[str, Any]:
        """What a resumed run must share with the run it continues (besides the train settings it checks)."""
        names = ("guidance_min", "guidance_max", "guidance_embedding", "solver_steps", "timestep_scaling",
                 "huber_c", "target_decay")  # fmt: skip
        settings = {"student": "lora" if self.lora else "full", **{name: getattr(self, name) for name in names}}
        for name in ("anchor_steps", "own_samples"):  # runs from before these existed resume
            if getattr(self, name):
                settings[name] = getattr(self, name)
        return settings
