"""The one way a network is changed at inference time: each change is recorded, can be listed, and undone exactly.

Every inference-time modification of a network (feature caching, FreeU, LoRA adapters and their merging, compute
dtype, int8, Winograd, chunked feed-forwards, gradient checkpointing) does its work and then calls :func:`record`
with how to undo it and whether a compiled or graph-recorded *plain* forward would still compute what the changed
network computes. The record lives in the changed module itself (a plain attribute, never a state-dict key), so

- :func:`active` lists what was done to a network and its submodules, in the order it was done;
- :func:`undo` reverts one change (the weights and the forward are bit for bit as before it);
- :func:`graph_safe` answers whether ``torch.compile``'s or a CUDA graph's recording of the plain forward may stand in
  for the network: a change that lives in the weights (a merged adapter, a cast of the stored weights) or in the
  module's own forward is safe; one that adds work beside the forward (a hook, per-call Python state) is not.

Nothing here reads PyTorch's private state: hooks a caller registers by hand, outside this module, are not seen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from torch import nn

from cinematic.errors import CinematicError

_LEDGER = "_cinematic_modifications"  # the attribute of a changed module that holds its records


@dataclass(frozen=True, eq=False)
class Modification:
    """One recorded change: ``kind`` (e.g. ``"freeu"``), ``detail`` (e.g. an adapter's name), how to revert it, and
    whether a compiled or recorded plain forward still computes the changed network (asked at each call, because
    some changes turn safe or unsafe later: an adapter merged into the weights, or set to scale 0)."""

    kind: str
    detail: str
    revert: Callable[[], None]
    safe: Callable[[], bool]

    @property
    def graph_safe(self) -> bool:
        return self.safe()

    def __repr__(self) -> str:
        return f"Modification({self.kind!r}, {self.detail!r}, graph_safe={self.graph_safe})"


def record(
    module: nn.Module, kind: str, detail: str, revert: Callable[[], None], graph_safe: bool | Callable[[], bool]
) -> Modification:
    """Note that ``module`` was just changed; ``revert`` must put it back exactly. Returns the record."""
    safe = graph_safe if callable(graph_safe) else (lambda: graph_safe)
    modification = Modification(kind, detail, revert, safe)
    _ledger(module).append(modification)
    return modification


def active(network: nn.Module, kind: str | None = None) -> list[Modification]:
    """The changes in force on ``network`` and its submodules (only those of ``kind`` when given), oldest first
    within each module."""
    found = [m for module in network.modules() for m in module.__dict__.get(_LEDGER, ())]
    return [m for m in found if kind is None or m.kind == kind]


def graph_safe(network: nn.Module) -> bool:
    """Whether a compiled or CUDA-graph recording of ``network``'s plain forward computes what it now computes."""
    return all(m.graph_safe for m in active(network))


def undo(network: nn.Module, modification: Modification) -> None:
    """Revert ``modification`` (a change to ``network`` or one of its submodules) and forget it."""
    for module in network.modules():
        ledger = module.__dict__.get(_LEDGER, [])
        if any(m is modification for m in ledger):
            modification.revert()  # may undo changes that depend on this one, and so edit the ledger
            ledger = [m for m in module.__dict__.get(_LEDGER, ()) if m is not modification]
            module.__dict__[_LEDGER] = ledger
            if not ledger:
                del module.__dict__[_LEDGER]  # the module is left exactly as it was found
            return
    raise CinematicError(f"{modification!r} is not in force on this network")


def undo_all(network: nn.Module, kind: str | None = None) -> None:
    """Revert every change (of ``kind``, when given), newest first, so each undo sees the state its change left."""
    for modification in reversed(active(network, kind)):
        undo(network, modification)


@contextmanager
def applied(network: nn.Module, modification: Modification | None) -> Iterator[Modification | None]:
    """Hold ``modification`` (already made, or None for nothing) for the block, then undo it."""
    try:
        yield modification
    finally:
        if modification is not None:
            undo(network, modification)


def _ledger(module: nn.Module) -> list[Modification]:
    # Stored in the instance's __dict__ directly: nn.Module.__setattr__ would do the same for a list, and this keeps
    # the record out of parameters, buffers and submodules, hence out of state dicts.
    return module.__dict__.setdefault(_LEDGER, [])
