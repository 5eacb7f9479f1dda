"""``train(config) -> Path``: open (or resume) a run, then step, log, checkpoint and sample until it ends.

AdamW with a linear warm-up and cosine decay, gradient clipping, EMA weights, optional gradient checkpointing and
bf16 autocast. Every random draw is a function of ``(seed, step)``: the data order and clip offsets
(``batches.BatchPlan``), the per-step CPU generator behind caption dropout, posterior samples, ``t`` and ``eps``, and
the global seed that the networks' own dropout reads, which is reset before every step. So a resumed run continues
the loss curve of an uninterrupted one exactly (bit for bit on the CPU; on CUDA up to the nondeterminism of some
cuDNN kernels).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cinematic.data.dataset import VideoDataset, vocabulary_texts
from cinematic.errors import CinematicError
from cinematic.models.components import COMPONENTS, Defaults, Model
from cinematic.train.batches import MODULES, PREVIEW, STEP, BatchPlan, derive_seed, generator, loader
from cinematic.train.config import TrainConfig
from cinematic.train.distributed import (
    Draws,
    Parallel,
    StepDraws,
    World,
    gathered,
    joined,
    micro_rows,
    module_seed_words,
    sharded_optimizer_state,
)
from cinematic.train.optimizers import build_optimizer, check_optimizer
from cinematic.train.setup import select_trainable, starting_config, starting_model, with_clip_size
from cinematic.train.state import (
    EMA,
    STATE_FILE,
    checkpoint_dir,
    latest_checkpoint,
    load_training_state,
    prepare_out,
    save_checkpoint,
    write_final,
)
from cinematic.train.unet import SampleFn, prompt_sampler, unet_loss
from cinematic.train.vae import SCALE_BATCHES, latent_scale, vae_loss, write_reconstructions

LOG_FILE = "log.jsonl"
RUN_FILE = "run.json"
SAMPLES_DIR = "samples"


def train(config: TrainConfig, *, dataset: VideoDataset | None = None, sample_fn: SampleFn | None = None) -> Path:
    """Run ``config`` and return the final model folder (``OUT/model``), or the last checkpoint when the run stops
    early at ``config.stop_at``.

    ``dataset`` replaces ``config.data`` (any ``cinematic.data.dataset.VideoDataset``; its first clip sets the clip
    size).
    ``sample_fn(model, step)`` is called every ``config.sample_every`` steps with the EMA weights swapped in and the
    networks in eval mode; by default it writes sample videos (reconstructions in the VAE stage) to ``OUT/samples``.

    Under ``torchrun`` each process is one rank of a data-parallel run (``train/distributed.py``): every rank
    returns the same path, and rank 0 alone writes into ``config.out``.
    """
    return run_training(config, dataset, sample_fn, Trainer)


def run_training(
    config: TrainConfig, dataset: VideoDataset | None, sample_fn: SampleFn | None, trainer: type[Trainer]
) -> Path:
    """Open (or resume) the run of ``config`` and fit it with ``trainer`` (``Trainer``, or a subclass with another
    loss: ``train/distill.py``)."""
    if config.init is not None:
        starting_config(config)  # a missing or broken starting model is said before --out is made
    with joined(config.device) as world:
        check_optimizer(config.optimizer, world.device)
        world.on_main(lambda: prepare_out(config.out, config.resume))
        found = world.on_main(lambda: _latest_name(config.out)) if config.resume else None
        checkpoint = config.out / found if found else None
        return trainer(_open_run(config, dataset, checkpoint, world), sample_fn).fit()


def _latest_name(out: Path) -> str | None:
    latest = latest_checkpoint(out)
    return latest.name if latest is not None else None


@dataclass
class Run:
    config: TrainConfig
    model: Model
    fresh: bool  # randomly initialised (then a VAE stage also sets the VAE's scaling factor)
    dataset: VideoDataset
    clip: tuple[int, int, int]  # frames, height, width
    start_step: int
    state: dict[str, Any] | None  # the training state resumed from
    world: World

    @property
    def device(self) -> torch.device:
        return self.world.device

    @property
    def global_batch(self) -> int:
        return self.config.batch_size * self.world.size * self.config.grad_accum


def _open_run(config: TrainConfig, dataset: VideoDataset | None, checkpoint: Path | None, world: World) -> Run:
    from cinematic.weights.native import read_native

    device = world.device
    state = load_training_state(checkpoint) if checkpoint is not None else None
    # The clip size defaults to what the starting model was trained on; a preset has not been trained on anything.
    base: Defaults | None = None
    if state is not None:
        _check_same_run(config, state, checkpoint)
        _check_same_batch(config, state, checkpoint, world)
        # A LoRA checkpoint holds an adapter, not a model: its clip size is that of the model it adapts.
        base = starting_config(config).defaults if config.lora else read_native(checkpoint).config.defaults
    elif config.preset is None:
        base = starting_config(config).defaults  # also says so when there is nothing to start from
    dataset, clip, texts = _dataset(config, dataset, base)
    if state is not None and config.lora is None:
        model, fresh, start = _resumed_model(checkpoint, state, device), bool(state["fresh"]), int(state["step"])
    else:  # a LoRA run resumes on its base model; the Trainer puts the adapter back from the state
        model, fresh = starting_model(config, texts(), device)
        start = int(state["step"]) if state is not None else 0
    factor = model.config.vae.downsample_factor
    if clip[1] % factor or clip[2] % factor:
        raise CinematicError(f"clips of {clip[2]}x{clip[1]} pixels: width and height must be multiples of {factor}")
    model.config = with_clip_size(model.config, *clip)
    return Run(config, model, fresh, dataset, clip, start, state, world)


def _check_same_run(config: TrainConfig, state: dict[str, Any], checkpoint: Path) -> None:
    then, now = state.get("distill"), config.distill_settings()
    if then != now:
        if then is None or now is None:
            command = "distill" if then is not None else "train"
            raise CinematicError(f"--resume: {checkpoint.name} is from a cinematic {command} run; continue it with "
                                 f"cinematic {command}")  # fmt: skip
        raise CinematicError(f"--resume: {checkpoint.name} was distilled with {then}, not {now}")
    if state["stage"] != config.stage or frozenset(state["parts"]) != config.trained_parts():
        raise CinematicError(
            f"--resume: {checkpoint.name} trained {'+'.join(state['parts'])} in the {state['stage']} stage, not "
            f"{'+'.join(sorted(config.trained_parts()))} in the {config.stage} stage"
        )


def _check_same_batch(config: TrainConfig, state: dict[str, Any], checkpoint: Path, world: World) -> None:
    """A run resumes with the global batch it had (so it sees the same clips and noise), however it is split now;
    what changed in the split is said on rank 0."""
    if state.get("optimizer_name", "adamw") != config.optimizer:
        raise CinematicError(f"--resume: {checkpoint.name} trained with --optimizer {state['optimizer_name']}, not "
                             f"{config.optimizer}")  # fmt: skip
    if "global_batch" not in state:  # a checkpoint older than data parallelism: one process
        return
    then = (state["batch_size"], state["world_size"], state["grad_accum"])
    now = (config.batch_size, world.size, config.grad_accum)
    split = "{} per process x {} processes x {} accumulation".format
    if state["global_batch"] != math.prod(now):
        raise CinematicError(
            f"--resume: {checkpoint.name} trained with a global batch of {state['global_batch']} ({split(*then)}); "
            f"this run's is {math.prod(now)} ({split(*now)}): choose --batch-size and --grad-accum so that batch x "
            f"processes x accumulation = {state['global_batch']}"
        )
    if then != now and world.is_main:
        print(
            f"resuming {checkpoint.name} as {split(*now)}, not {split(*then)}: the global batch of "
            f"{state['global_batch']} is unchanged, so the run continues with the same clips and noise (the "
            "networks' dropout masks are drawn per process)",
            file=sys.stderr,
        )


def _dataset(
    config: TrainConfig, dataset: VideoDataset | None, base: Defaults | None
) -> tuple[VideoDataset, tuple[int, int, int], Callable[[], Sequence[str]]]:
    """The dataset, its clip size (frames, height, width), and the texts a new tokenizer would learn from."""
    if dataset is not None:
        if len(dataset) == 0:
            raise CinematicError("the training dataset is empty")
        _, frames, height, width = dataset[0]["video"].shape
        return dataset, (frames, height, width), lambda: vocabulary_texts(dataset)
    from cinematic.data import files, shapes

    is_shapes = config.data == "shapes"
    fallback = (shapes.FRAMES, shapes.SIZE) if is_shapes else (files.FILE_FRAMES, files.FILE_SIZE)
    frames = config.frames or (base.frames if base else fallback[0])
    height = config.height or (base.height if base else fallback[1])
    width = config.width or (base.width if base else fallback[1])
    if is_shapes:
        if height != width:
            raise CinematicError(f"shapes clips are square; got height {height} and width {width}")
        # The training captions; the vocabulary comes from all 48 (the held-out ones recombine words the training
        # captions already use).
        generated = shapes.ShapesDataset(shapes.TRAIN_CAPTIONS, size=height, frames=frames, seed=config.seed)
        return generated, (frames, height, width), lambda: shapes.ALL_CAPTIONS
    clips = files.VideoFiles.from_captions(config.data, frames, height, width, config.frame_stride)
    return clips, (frames, height, width), lambda: clips.captions


def _resumed_model(checkpoint: Path, state: dict[str, Any], device: torch.device) -> Model:
    """The checkpoint's networks with their raw (not averaged) weights, and its tokenizer."""
    from cinematic.tokenizer import Tokenizer
    from cinematic.weights import build_networks
    from cinematic.weights.files import load_into
    from cinematic.weights.native import read_native

    source = read_native(checkpoint)
    networks = build_networks(source.config)
    for name, network in networks.items():
        load_into(network, dict(state["networks"][name]), f"{checkpoint / STATE_FILE} ({name})", torch.float32, device)
    tokenizer = Tokenizer.from_folder(checkpoint / "tokenizer", source.config.text_encoder.context_length)
    return Model(source.config, **networks, tokenizer=tokenizer, source=str(checkpoint), format="cinematic")


def learning_rate(step: int, base: float, warmup: int, total: int) -> float:
    """The rate of update ``step`` (0-based): linear warm-up over ``warmup`` updates, then cosine decay to zero."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


class Trainer:
    """One open run: the trainable parameters, optimizer, EMA and loss of its stage."""

    def __init__(self, run: Run, sample_fn: SampleFn | None):
        self.run, self.config, self.model, self.world = run, run.config, run.model, run.world
        c, model = run.config, run.model
        _own_storage(model)
        if c.lora is not None:
            from cinematic.train.lora_training import lora_trainable

            self.trainable = lora_trainable(model, c.lora_config(), c.seed, run.state)
        else:
            self.trainable = select_trainable(model, c.stage, c.trained_parts())
        self.params = [p for named in self.trainable.values() for _, p in named]
        if not self.params:
            raise CinematicError(f"{c.parts or c.stage}: this model has no such parameters to train")
        if c.gradient_checkpointing:
            from cinematic.models.layers import checkpoint_gradients

            for network in (model.unet, model.vae):
                checkpoint_gradients(network)
        if c.dropout is not None:
            for module in model.unet.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = c.dropout
        self.train_data = self._training_data()
        self.parallel = Parallel({name: getattr(model, name) for name in self.trainable}, self.loss, run.world, c.fsdp)
        if c.fsdp:  # sharding replaced the parameters
            self.trainable = {
                name: [(n, p) for n, p in getattr(model, name).named_parameters() if p.requires_grad]
                for name in self.trainable
            }
            self.params = [p for named in self.trainable.values() for _, p in named]
        self.optimizer = build_optimizer(c.optimizer, self._param_groups(), c.lr, c.adam_betas, c.weight_decay)
        self.ema = EMA(self.trainable, c.ema_decay)
        if run.state is not None:
            self.optimizer.load_state_dict(sharded_optimizer_state(run.state["optimizer"], self.params))
            self.ema.load_state_dict(run.state["ema"])
        self.tokenizer_dir = c.out / "tokenizer"
        if run.world.is_main:
            model.tokenizer.save(self.tokenizer_dir)
        self.precision = c.precision or ("bf16" if run.device.type == "cuda" else "fp32")
        self.alpha_bar = model.config.schedule.alpha_bar()
        self._preview: list[dict[str, Any]] | None = None
        self.sample_fn = sample_fn if sample_fn is not None or not c.sample_every else self._default_sampler()

    def _training_data(self) -> VideoDataset:
        """The dataset the loader reads: the run's, or, with ``--cache-latents``, its cached latents (filled now).
        Without sample videos to draw, the networks the cache replaces then leave the device for the CPU."""
        c, run = self.config, self.run
        if c.cache_latents is None:
            return run.dataset
        from cinematic.train.cache import cached_dataset

        plan = self._plan(run.start_step, c.stop_at or c.steps, everyone=True)
        data = cached_dataset(c, self.model, run.dataset, run.clip, run.world, plan)
        if not c.sample_every:
            self.model.vae.to("cpu")
            if data.empty is not None:  # the text features are cached too
                self.model.text_encoder.to("cpu")
        return data

    def _param_groups(self) -> list[dict[str, Any]]:
        """One group, or two when the text encoder learns at its own rate (``text_lr_scale``)."""
        scale = self.config.text_lr_scale
        if scale == 1.0 or "text_encoder" not in self.trainable:
            return [{"params": self.params, "lr_scale": 1.0}]
        groups = {True: [], False: []}  # is it the text encoder's?
        for network, named in self.trainable.items():
            groups[network == "text_encoder"].extend(p for _, p in named)
        return [{"params": groups[False], "lr_scale": 1.0}, {"params": groups[True], "lr_scale": scale}]

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.run.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    def loss(self, batch: dict[str, Any], draws: Draws) -> tuple[torch.Tensor, dict[str, float]]:
        c = self.config
        if c.stage == "vae":
            return vae_loss(self.model, batch, draws, c.kl_weight, self.autocast)
        timesteps = (c.timestep_sampling, c.timestep_mean, c.timestep_std)
        return unet_loss(self.model, batch, draws, self.alpha_bar, c.caption_dropout, self.autocast, timesteps)

    def _plan(self, start: int, stop: int, everyone: bool = False) -> BatchPlan:
        """This rank's micro-batches of steps ``start`` to ``stop`` (``everyone``: those of all ranks)."""
        c, world = self.config, self.run.world
        rank, size = (0, 1) if everyone else (world.rank, world.size)
        batch = c.batch_size * (world.size if everyone else 1)
        return BatchPlan(len(self.run.dataset), batch, c.grad_accum, c.seed, start, stop, rank, size)

    def fit(self) -> Path:
        c, start, world = self.config, self.run.start_step, self.world
        stop = c.stop_at or c.steps
        if start >= stop:
            latest = latest_checkpoint(c.out)
            return self._finish(latest) if start >= c.steps else latest
        self._announce(start, stop)
        batches = loader(self.train_data, self._plan(start, stop), c.workers, pin=self.run.device.type == "cuda")
        bar = _progress(stop - start, f"training {c.stage}") if c.progress and world.is_main else None
        checkpoint = None
        with self._log(start) as log:
            for step in range(start, stop):
                began = time.perf_counter()
                metrics = self.step(step, [next(batches) for _ in range(c.grad_accum)])
                done = step + 1
                seconds = time.perf_counter() - began  # data loading included
                if log is not None:
                    log.write(json.dumps({"step": done, **metrics, "seconds": round(seconds, 4)}) + "\n")
                    log.flush()
                if bar is not None:
                    bar.update(loss=metrics["loss"], lr=metrics["lr"])
                if done % c.save_every == 0 or done == stop:
                    checkpoint = self.save(done)
                if self.sample_fn is not None and c.sample_every and done % c.sample_every == 0:
                    self.sample(done)
        if bar is not None:
            bar.close()
        return self._finish(checkpoint) if stop == c.steps else self._finish(checkpoint, final=False)

    def _finish(self, checkpoint: Path, final: bool = True) -> Path:
        """``OUT/model`` (or the checkpoint of a run that stops early), once rank 0 has written it."""
        done = self.world.on_main(lambda: (write_final(self.config.out, checkpoint) if final else checkpoint).name)
        return self.config.out / done

    def step(self, step: int, batches: list[dict[str, Any]]) -> dict[str, float]:
        """One optimizer update over this rank's micro-batches of ``step`` (0-based); returns the metrics averaged
        over micro-batches and ranks."""
        c, world = self.config, self.world
        lr = learning_rate(step, c.lr, c.warmup_steps, c.steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # absent in checkpoints older than it
        # The networks' dropout (CPU and CUDA); rank 0 draws what one process would.
        torch.manual_seed(derive_seed(c.seed, MODULES, *module_seed_words(step, world.rank)))
        draws = StepDraws(generator(c.seed, STEP, step, 0), self.run.global_batch)
        totals: dict[str, float] = {}
        for micro, batch in enumerate(batches):
            with self.parallel.syncing(last=micro == len(batches) - 1):
                loss, extra = self.parallel(batch, draws.rows(micro_rows(micro, c.batch_size, world)))
                (loss / len(batches)).backward()
            for key, value in {"loss": loss.item(), **extra}.items():
                totals[key] = totals.get(key, 0.0) + value / len(batches)
        totals = world.mean(totals)
        if not math.isfinite(totals["loss"]):
            raise CinematicError(
                f"the loss is {totals['loss']} at step {step + 1}; lower --lr and resume from the last checkpoint"
            )
        norm = torch.nn.utils.clip_grad_norm_(self.params, c.grad_clip if c.grad_clip > 0 else math.inf)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update(step)
        return {**totals, "lr": lr, "grad_norm": float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)}

    def save(self, done: int) -> Path:
        """``OUT/checkpoint-<done>``, written by rank 0 (the others name it and go on). Under FSDP every rank first
        takes part in gathering the whole weights and state, so the checkpoint is the same as without it."""
        c, model, world = self.config, self.model, self.world
        if not world.is_main and not c.fsdp:
            return checkpoint_dir(c.out, done)
        if self.run.fresh and c.stage == "vae":
            self._rescale_latents()
        state = {
            "step": done,
            "stage": c.stage,
            "parts": sorted(c.trained_parts()),
            "fresh": self.run.fresh,
            "networks": gathered({name: getattr(model, name).state_dict() for name in COMPONENTS}),
            "ema": gathered(self.ema.state_dict()),
            "optimizer": gathered(self.optimizer.state_dict()),
            "optimizer_name": c.optimizer,
            # How the global batch was split, so that a resumed run can check it and say what changed.
            "global_batch": self.run.global_batch,
            "batch_size": c.batch_size,
            "world_size": world.size,
            "grad_accum": c.grad_accum,
            "distill": c.distill_settings(),
            **self.extra_state(),
        }
        averaged = {name: gathered(self.ema.network_state(name, getattr(model, name))) for name in COMPONENTS}
        if not world.is_main:
            return checkpoint_dir(c.out, done)
        if c.lora is not None:
            from cinematic.train.lora_training import save_lora_checkpoint

            return save_lora_checkpoint(c.out, done, model, self.ema, self.trainable, state, c, self.adapter_info())
        keep = c.keep_checkpoints
        return save_checkpoint(c.out, done, model, averaged, state, self.tokenizer_dir, c.save_dtype, keep)

    def extra_state(self) -> dict[str, Any]:
        """What a subclass adds to the training state of each checkpoint (nothing here)."""
        return {}

    def adapter_info(self) -> dict[str, Any]:
        """What a subclass adds to a LoRA checkpoint's ``lora.json`` (nothing here)."""
        return {}

    def sample(self, done: int) -> None:
        """``sample_fn`` on the EMA weights in eval mode, on rank 0; the training state is left exactly as it was."""
        if not self.world.is_main:
            return
        networks = [getattr(self.model, name) for name in COMPONENTS]
        modes = [network.training for network in networks]
        for network in networks:
            network.eval()
        try:
            with self.ema.swapped(), torch.no_grad():
                self.sample_fn(self.model, done)
        finally:
            for network, mode in zip(networks, modes):
                network.train(mode)

    def preview_batches(self) -> list[dict[str, Any]]:
        """A fixed few batches, the same at every checkpoint, for the latent scale and the reconstructions."""
        if self._preview is None:
            c = self.config
            plan = BatchPlan(len(self.run.dataset), c.batch_size, 1, derive_seed(c.seed, PREVIEW), 0, SCALE_BATCHES)
            self._preview = list(loader(self.run.dataset, plan))
        return self._preview

    def _rescale_latents(self) -> None:
        with self.ema.swapped():
            scale = latent_scale(self.model, self.preview_batches(), generator(self.config.seed, PREVIEW))
        vae_config = dataclasses.replace(self.model.config.vae, scaling_factor=scale)
        self.model.config = dataclasses.replace(self.model.config, vae=vae_config)
        self.model.vae.config = vae_config

    def _default_sampler(self) -> SampleFn | None:
        c, folder = self.config, self.config.out / SAMPLES_DIR
        fps = self.model.config.defaults.fps
        if c.stage == "vae":

            def reconstruct(model: Model, step: int) -> None:
                folder.mkdir(parents=True, exist_ok=True)
                batch = self.preview_batches()[0]
                batch = {"video": batch["video"][:2], "caption": batch["caption"][:2]}
                write_reconstructions(model, batch, folder / f"step-{step:06d}.mp4", fps)

            return reconstruct
        prompts = c.sample_prompts or first_captions(self.run.dataset, 2)
        return prompt_sampler(folder, prompts, self.run.clip, c.sample_steps, c.sample_guidance, c.seed)

    def _log(self, start: int):
        """``OUT/log.jsonl``, one line per update; lines past ``start`` (from an interrupted run) are dropped. Rank 0
        writes it and ``run.json``; the other ranks get None."""
        if not self.world.is_main:
            return contextlib.nullcontext(None)
        path = self.config.out / LOG_FILE
        kept = []
        if path.is_file():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= start]
        path.write_text("".join(line + "\n" for line in kept))
        run = {**self.config.to_json(), "start_step": start, "processes": self.world.size}
        run["global_batch"] = self.run.global_batch
        (self.config.out / RUN_FILE).write_text(json.dumps(run, indent=2))
        return path.open("a")

    def _announce(self, start: int, stop: int) -> None:
        if not self.config.progress or not self.world.is_main:
            return
        c, run = self.config, self.run
        trained = sum(p.numel() for p in self.params)
        total = sum(p.numel() for name in COMPONENTS for p in getattr(self.model, name).parameters())
        what = "+".join(sorted(c.trained_parts())) if c.lora is None else f"LoRA rank {c.lora} ({c.lora_targets})"
        source = "resumed from step " + str(start) if run.state else (c.init or f"fresh {c.preset}")
        processes = f"{self.world.size} process{'es' if self.world.size > 1 else ''}"
        print(
            f"training {what} ({trained:,} of {total:,} parameters), {source}; {len(run.dataset):,} clips of "
            f"{run.clip[0]}x{run.clip[1]}x{run.clip[2]}, global batch {run.global_batch} = {c.batch_size} per "
            f"process x {processes} x {c.grad_accum} accumulation, steps {start}->{stop}, {run.device.type} "
            f"{self.precision}{' FSDP' if c.fsdp else ''}",
            file=sys.stderr,
        )


def _own_storage(model: Model) -> None:
    """Give every weight its own freshly allocated storage. Weights read from a safetensors file are views into
    one buffer at arbitrary offsets, and some CPU kernels round differently on differently aligned data, which
    would make a run started from a file and a run resumed from a checkpoint differ in the last bit."""
    with torch.no_grad():
        for name in COMPONENTS:
            for tensor in [*getattr(model, name).parameters(), *getattr(model, name).buffers()]:
                tensor.data = tensor.data.clone()


def first_captions(dataset: VideoDataset, count: int) -> tuple[str, ...]:
    captions = getattr(dataset, "captions", None) or [dataset[i]["caption"] for i in range(min(count, len(dataset)))]
    return tuple(list(dict.fromkeys(captions))[:count])


def _progress(total: int, label: str):
    from cinematic.progress import Progress

    return Progress(total, label)
