"""LoRA runs of ``cinematic train --lora RANK``: adapters on the UNet's attention, everything else frozen.

The loop is the ordinary one (``train/loop.py``); what differs is which parameters train (the adapters' down and up
matrices, :func:`lora_trainable`) and what a checkpoint holds (:func:`save_lora_checkpoint`): the EMA adapter as
``pytorch_lora_weights.safetensors`` + ``lora.json`` (see ``weights/lora_formats.py``) and a training state with the
raw adapter, the optimizer and the step. A resumed run rebuilds its base model from ``--init`` and the adapter from
that state.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cinematic.errors import CinematicError
from cinematic.models import lora_adapters
from cinematic.models.components import Model
from cinematic.models.lora_adapters import LoRAConfig
from cinematic.train.batches import INIT, derive_seed
from cinematic.train.state import DTYPES, EMA, LATEST_FILE, STATE_FILE, STATE_VERSION, checkpoint_dir

NAME = lora_adapters.DEFAULT_NAME


def lora_trainable(
    model: Model, config: LoRAConfig, seed: int, state: dict[str, Any] | None
) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Attach fresh adapters (seeded ``down`` init, zero ``up``) to the UNet, or the resumed run's adapters, and
    freeze every other parameter; returns the adapters' parameters by name, as ``setup.select_trainable`` does."""
    for network in (model.unet, model.text_encoder, model.vae):
        network.requires_grad_(False)
        network.eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, INIT))
        lora_adapters.add_lora(model.unet, config, NAME)
    named = [(n, p) for n, p in model.unet.named_parameters() if f".{lora_adapters.ADAPTERS}.{NAME}." in n]
    if state is not None:
        saved = state["networks"]["unet"]
        alpha = config.alpha if config.alpha is not None else float(config.rank)
        settings = {"rank": config.rank, "alpha": alpha, "targets": config.targets}
        if state.get("lora") != settings or set(saved) != {n for n, _ in named}:
            raise CinematicError("--resume: the checkpoint's LoRA adapter does not fit this run's --lora settings")
        with torch.no_grad():
            for n, p in named:
                p.copy_(saved[n])
    for _, p in named:
        p.requires_grad_(True)
    model.unet.train()
    return {"unet": named}


def save_lora_checkpoint(
    out: Path,
    step: int,
    model: Model,
    ema: EMA,
    trainable: dict[str, list[tuple[str, nn.Parameter]]],
    training_state: dict[str, Any],
    config: Any,
    extra: dict[str, Any] | None = None,
) -> Path:
    """``OUT/checkpoint-<step>``: the EMA adapter and the training state, written atomically as
    ``state.save_checkpoint`` writes a model checkpoint. ``extra`` goes into the adapter's ``lora.json``."""
    from cinematic.train.state import prune_checkpoints, write_text_atomically
    from cinematic.weights.lora_formats import write_adapter

    lora = config.lora_config()
    target = checkpoint_dir(out, step)
    staging = out / f".{target.name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    with ema.swapped():
        adapter = {k: (d.clone(), u.clone(), a) for k, (d, u, a) in lora_adapters.adapter_state(model.unet).items()}
    alpha = lora.alpha if lora.alpha is not None else float(lora.rank)
    write_adapter(staging, adapter, lora.rank, alpha, lora.targets, DTYPES[config.save_dtype], extra)
    raw = {n: p.detach().clone() for n, p in trainable["unet"]}
    settings = {"rank": lora.rank, "alpha": alpha, "targets": lora.targets}
    state = {"version": STATE_VERSION, **training_state, "networks": {"unet": raw}, "lora": settings}
    torch.save(state, staging / STATE_FILE)
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)
    write_text_atomically(out / LATEST_FILE, target.name + "\n")
    prune_checkpoints(out, target, config.keep_checkpoints)
    return target
