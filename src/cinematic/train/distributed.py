"""Data-parallel training over the processes that ``torchrun`` starts: the process group, each rank's device, its
share of every step, gradient averaging (DDP or FSDP2), and rank 0 alone writing.

``torchrun --nproc_per_node N -m cinematic train ...`` (or ``--nnodes M --rdzv-endpoint HOST:PORT`` across
machines) sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` for each process; :func:`joined` reads them, joins the
group (NCCL on CUDA, gloo on the CPU) and leaves it when the run ends. A plain ``cinematic train`` is a world of
one and never touches ``torch.distributed``.

How a step is split (:func:`micro_rows`): the global batch ``G = batch_size x world_size x grad_accum`` of step
``s`` is samples ``s*G ... s*G + G - 1`` of the run, and micro-batch ``a`` of rank ``r`` holds the ``batch_size``
rows from ``(a * world_size + r) * batch_size``. Every random draw of the step is made for all ``G`` rows by every
rank from the step's own generator, and each micro-batch takes its rows (:class:`StepDraws`). So which clips a step
sees, and their noise, timesteps and dropped captions, depend on ``G`` alone, not on how it is split over
processes and accumulation: 2 processes of batch 2 train as 1 process of batch 4, and a run can resume on another
number of processes. Only the networks' own dropout masks are drawn per rank (from ``(seed, step, rank)``).

This module holds no training logic, so ``cinematic distill`` can launch and split its steps the same way.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
from torch import nn

from cinematic.errors import CinematicError

# How long a rank waits for the others in one collective before the run fails (a peer that died is usually
# noticed at once: its sockets close, and torchrun stops the remaining ranks).
TIMEOUT = timedelta(minutes=30)
# What gloo's and NCCL's errors say when a peer died mid-collective (gloo raises a plain RuntimeError).
PEER_FAILED = ("Connection closed by peer", "Connection reset by peer", "NCCL communicator", "ProcessGroupGloo")


@dataclass(frozen=True)
class World:
    """This process's place in the run: rank ``rank`` of ``size``, on ``device``."""

    rank: int = 0
    size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes checkpoints, samples, logs and progress."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.size > 1:
            torch.distributed.barrier()

    def on_main(self, fn: Callable[[], str | None]) -> str | None:
        """``fn()`` on rank 0; every rank returns its result, or raises the :class:`CinematicError` it raised.

        For decisions that must be the same on every rank (which checkpoint to resume) and checks with a side
        effect (creating ``--out``): run once, shared as text (no pickling between processes)."""
        if self.size == 1:
            return fn()
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except CinematicError as e:
                error = str(e)
        error = self._share(error)
        if error is not None:
            raise CinematicError(error)
        return self._share(result)

    def _share(self, text: str | None) -> str | None:
        data = torch.tensor(list(text.encode()) if text is not None else [], dtype=torch.uint8)
        length = torch.tensor([len(data) if text is not None else -1], dtype=torch.long, device=self.device)
        torch.distributed.broadcast(length, 0)
        if int(length) < 0:
            return None
        buffer = (
            data.to(self.device) if self.is_main else torch.empty(int(length), dtype=torch.uint8, device=self.device)
        )
        torch.distributed.broadcast(buffer, 0)
        return bytes(buffer.cpu().tolist()).decode()

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """The mean over ranks of each value (every rank holds the same keys)."""
        if self.size == 1:
            return values
        keys = sorted(values)
        total = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(total)
        return {k: float(v) / self.size for k, v in zip(keys, total.tolist())}


def rank_device(name: str | None, local_rank: int) -> torch.device:
    """The device of this rank: ``cuda`` (or none named, with CUDA present) means ``cuda:LOCAL_RANK``."""
    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CinematicError("--device cuda: no CUDA device is available")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def launched_size() -> int:
    """``WORLD_SIZE`` as torchrun sets it (1 without a launcher)."""
    value = os.environ.get("WORLD_SIZE", "1")
    if not value.isdigit() or int(value) < 1:
        raise CinematicError(f"WORLD_SIZE must be a positive integer (torchrun sets it), not {value!r}")
    return int(value)


@contextmanager
def joined(device_name: str | None) -> Iterator[World]:
    """This process's :class:`World`, in the process group for the duration of the block.

    Under torchrun the group is joined here and left at the end, after a barrier, so that the rank that finishes first
    (rank 1, while rank 0 writes the last checkpoint) does not close its connections under a rank still using them:
    rank 0 died now and then with SIGABRT ("terminate called without an active exception") as it left, twice in about
    six CI runs, most likely for that reason. A group the caller already made is used as it is.
    An error on one rank ends the block on that rank with the rank named; the others fail in their next collective
    (gloo notices the closed connection) or are stopped by torchrun."""
    import torch.distributed as dist

    made = False
    if dist.is_available() and dist.is_initialized():
        rank, size = dist.get_rank(), dist.get_world_size()
    else:
        size, rank = launched_size(), int(os.environ.get("RANK", "0"))
    device = rank_device(device_name, int(os.environ.get("LOCAL_RANK", rank)))
    if size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL's collectives run on the current device
        dist.init_process_group(backend, timeout=TIMEOUT)
        made = True
    try:
        yield World(rank, size, device)
        if made:  # no rank leaves while another still talks to it: gloo aborts a process whose peer has gone
            dist.barrier()
    except CinematicError as e:
        raise CinematicError(f"rank {rank} of {size}: {e}" if size > 1 else str(e)) from None
    except (dist.DistError, RuntimeError) as e:
        if size == 1 or not (isinstance(e, dist.DistError) or any(m in str(e) for m in PEER_FAILED)):
            raise
        # a peer failed (its own error is on its own stderr): one line here, not a traceback
        raise CinematicError(f"rank {rank} of {size}: another rank failed ({str(e).splitlines()[0][:200]})") from None
    finally:
        if made:
            dist.destroy_process_group()


def micro_rows(micro: int, batch_size: int, world: World) -> slice:
    """The rows of the step's global batch that micro-batch ``micro`` of this rank holds."""
    first = (micro * world.size + world.rank) * batch_size
    return slice(first, first + batch_size)


class StepDraws:
    """The random draws of one step, made for its whole global batch of ``total`` rows and shared by its
    micro-batches: each takes its own rows (:meth:`rows`). Draws are made in the order the loss asks for them, the
    first time it asks, so with one micro-batch of the whole batch they are exactly ``rng``'s plain draws."""

    def __init__(self, rng: torch.Generator, total: int):
        self.rng, self.total = rng, total
        self.drawn: list[torch.Tensor] = []

    def rows(self, rows: slice) -> Draws:
        return Draws(self, rows)


class Draws:
    """The draws of one micro-batch: ``take(fn)`` returns this micro-batch's rows of ``fn(generator, total)``."""

    def __init__(self, step: StepDraws, rows: slice):
        self.step, self.rows, self.count = step, rows, 0

    def take(self, fn: Callable[[torch.Generator, int], torch.Tensor]) -> torch.Tensor:
        if self.count == len(self.step.drawn):
            drawn = fn(self.step.rng, self.step.total)
            if drawn.shape[0] != self.step.total:
                raise ValueError(f"a step draw must have one row per sample ({self.step.total}), not {drawn.shape[0]}")
            self.step.drawn.append(drawn)
        drawn = self.step.drawn[self.count]
        self.count += 1
        return drawn[self.rows]


def module_seed_words(step: int, rank: int) -> tuple[int, ...]:
    """The words of the seed of the networks' own dropout at ``step`` on ``rank`` (rank 0: as one process)."""
    return (step,) if rank == 0 else (step, rank)


class LossModule(nn.Module):
    """The trained networks as one module whose forward is the loss, so that DDP sees one forward per micro-batch."""

    def __init__(self, networks: dict[str, nn.Module], loss: Callable[..., Any]):
        super().__init__()
        self.networks = nn.ModuleDict(networks)
        self.loss = loss

    def forward(self, *args: Any) -> Any:
        return self.loss(*args)


class Parallel:
    """The loss, run so that the backward pass averages the gradients over the ranks: under DDP, after the last
    micro-batch of a step only (:meth:`syncing`); under FSDP2 the sharded networks reduce their own gradients.

    With ``fsdp`` the networks are sharded here: their parameters become new (DTensor) parameters, so collect them
    again after this."""

    def __init__(self, networks: dict[str, nn.Module], loss: Callable[..., Any], world: World, fsdp: bool):
        self.loss, self.ddp = loss, None
        if world.size > 1 and fsdp:
            shard(networks, world)
        elif world.size > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [world.device.index] if world.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(LossModule(networks, loss), device_ids=ids)

    def __call__(self, *args: Any) -> Any:
        return self.ddp(*args) if self.ddp is not None else self.loss(*args)

    def syncing(self, last: bool) -> AbstractContextManager:
        """Around the forward and backward of a micro-batch: gradients are averaged after the step's last one."""
        return self.ddp.no_sync() if self.ddp is not None and not last else nullcontext()


def shard(networks: dict[str, nn.Module], world: World) -> None:
    """FSDP2 (``fully_shard``): every block of each network (each member of its module lists), then the network
    itself, is sharded over the ranks, so a rank holds ``1 / size`` of the weights, gradients and optimizer state
    and gathers one block's weights at a time."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(world.device.type, (world.size,))
    for network in networks.values():
        blocks: dict[str, nn.Module] = {}  # the members of the outermost module lists (UNet levels, text layers)
        for name, module in network.named_modules():  # parents before children
            inside = any(name.startswith(block + ".") for block in blocks)
            if isinstance(module, nn.ModuleList) and not inside:
                blocks.update({f"{name}.{i}": block for i, block in enumerate(module)})
        for block in blocks.values():
            if any(p.requires_grad for p in block.parameters()):
                fully_shard(block, mesh=mesh)
        fully_shard(network, mesh=mesh)


def gathered(value: Any) -> Any:
    """``value`` with every sharded tensor (DTensor) in it replaced by the whole tensor; a collective under FSDP:
    every rank calls it in the same order."""
    if hasattr(value, "full_tensor"):
        return value.full_tensor()
    if isinstance(value, dict):
        return {k: gathered(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(gathered(v) for v in value)
    return value


def shaped_like(target: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """``whole`` as ``target`` holds it: this rank's shard when ``target`` is sharded, else ``whole`` itself."""
    if not hasattr(target, "device_mesh"):
        return whole
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(whole.to(target.device_mesh.device_type), target.device_mesh, target.placements)


def sharded_optimizer_state(state: dict[str, Any], params: list[nn.Parameter]) -> dict[str, Any]:
    """A saved (whole) optimizer state, its per-parameter tensors sharded as ``params`` are (the optimizer's
    parameters in order); a state without sharded parameters is returned as it is."""
    if not any(hasattr(p, "device_mesh") for p in params):
        return state
    per_param = {
        index: {k: shaped_like(params[index], v) if v.dim() > 0 else v for k, v in entry.items()}
        for index, entry in state["state"].items()
    }
    return {**state, "state": per_param}
