"""EMA weights and checkpoints.

``OUT/checkpoint-000500/`` is a model folder in cinematic's own format holding the EMA weights (so ``--model
OUT/checkpoint-000500`` just works), plus ``training_state.pt``: the raw weights of every network, the EMA copy, the
optimizer state and the step. Nothing else is needed to resume exactly: every random draw of the run is a function
of (seed, step) (see ``train/batches.py``). Only the newest checkpoint keeps its training state, which for the full
model is several times the size of the model.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cinematic.errors import CinematicError
from cinematic.models.components import COMPONENTS, Model

STATE_FILE = "training_state.pt"
LATEST_FILE = "latest"
FINAL_DIR = "model"
STATE_VERSION = 1
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class EMA:
    """An exponential moving average of the trainable parameters, in float32.

    ``decay`` warms up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so that a short run's average is
    not dominated by its random init.
    """

    def __init__(self, trainable: dict[str, list[tuple[str, nn.Parameter]]], decay: float):
        self.decay = decay
        self.names = [(network, name) for network, named in trainable.items() for name, _ in named]
        self.params = [p for named in trainable.values() for _, p in named]
        self.shadow = [p.detach().float().clone() for p in self.params] if decay > 0 else []

    @torch.no_grad()
    def update(self, updates: int) -> None:
        if not self.shadow:
            return
        decay = min(self.decay, (1 + updates) / (10 + updates))
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1.0 - decay)

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """The networks hold the EMA weights inside the block and their raw weights again after it (no copies)."""
        self._swap()
        try:
            yield
        finally:
            self._swap()

    def _swap(self) -> None:
        for p, s in zip(self.params, self.shadow):
            p.data, s.data = s.data, p.data

    def network_state(self, network_name: str, network: nn.Module) -> dict[str, torch.Tensor]:
        """The network's state dict with the averaged values of its trainable parameters."""
        state = dict(network.state_dict())
        for (owner, name), s in zip(self.names, self.shadow):
            if owner == network_name:
                state[name] = s
        return state

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{owner}.{name}": s for (owner, name), s in zip(self.names, self.shadow)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = set(self.state_dict())
        if set(state) != expected:
            raise CinematicError("the checkpoint's EMA weights do not match the parameters this run trains")
        from cinematic.train.distributed import shaped_like

        for (owner, name), s in zip(self.names, self.shadow):
            s.copy_(shaped_like(s, state[f"{owner}.{name}"]))


def checkpoint_dir(out: Path, step: int) -> Path:
    return out / f"checkpoint-{step:06d}"


def latest_checkpoint(out: Path) -> Path | None:
    """The newest ``checkpoint-*`` folder of ``out`` that can be resumed from."""
    found = [p for p in out.glob("checkpoint-*") if p.is_dir() and (p / STATE_FILE).is_file()]
    return max(found, key=lambda p: p.name) if found else None


def prepare_out(out: Path, resume: bool) -> None:
    if out.exists() and not out.is_dir():
        raise CinematicError(f"--out {out} is a file; it must be a folder")
    if not resume and out.is_dir() and any(out.iterdir()):
        raise CinematicError(f"--out {out} is not empty: pass --resume to continue the run in it, or choose a new one")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CinematicError(f"cannot create {out}: {e.strerror or e}") from None
    if not os.access(out, os.W_OK):
        raise CinematicError(f"cannot write into {out}")


def save_checkpoint(
    out: Path,
    step: int,
    model: Model,
    networks: dict[str, dict[str, torch.Tensor]],
    training_state: dict[str, Any],
    tokenizer_dir: Path,
    save_dtype: str,
    keep: int | None,
) -> Path:
    """Write ``checkpoint-<step>`` atomically (it appears complete or not at all), point ``latest`` at it, and
    drop older training states and, beyond ``keep``, older checkpoints. ``networks`` holds the weights the model
    files get (the EMA ones: ``EMA.network_state``)."""
    from cinematic.weights.native import write_native

    target = checkpoint_dir(out, step)
    staging = out / f".{target.name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    states = {name: (lambda name=name: networks[name]) for name in COMPONENTS}
    write_native(staging, model.config, states, tokenizer_dir, DTYPES[save_dtype])
    torch.save({"version": STATE_VERSION, **training_state}, staging / STATE_FILE)
    if target.exists():  # a resumed run re-saving a step it had saved before
        shutil.rmtree(target)
    os.replace(staging, target)
    write_text_atomically(out / LATEST_FILE, target.name + "\n")
    prune_checkpoints(out, target, keep)
    return target


def load_training_state(folder: Path) -> dict[str, Any]:
    try:
        state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which, in one line
        raise CinematicError(f"cannot read {folder / STATE_FILE}: {str(e).splitlines()[0]}") from None
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise CinematicError(f"{folder / STATE_FILE} is not a training state this cinematic can resume")
    return state


def write_final(out: Path, checkpoint: Path) -> Path:
    """``OUT/model``: the final checkpoint's model files without the training state, hard-linked (no extra disk)
    where the file system allows."""
    final, staging = out / FINAL_DIR, out / f".{FINAL_DIR}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(checkpoint, staging, ignore=shutil.ignore_patterns(STATE_FILE), copy_function=_link_or_copy)
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    return final


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def write_text_atomically(path: Path, text: str) -> None:
    """``path`` holds the old text or the new, never part of either (a reader of ``latest`` mid-write)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def prune_checkpoints(out: Path, newest: Path, keep: int | None) -> None:
    """Drop the training state of every checkpoint older than ``newest``, and, beyond ``keep``, the oldest
    checkpoints themselves."""
    older = sorted(p for p in out.glob("checkpoint-*") if p.is_dir() and p.name < newest.name)
    for folder in older:
        (folder / STATE_FILE).unlink(missing_ok=True)
    if keep is not None:
        for folder in older[: max(len(older) - (keep - 1), 0)]:
            shutil.rmtree(folder)
