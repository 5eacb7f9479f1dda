"""A restricted unpickler for PyTorch-Lightning checkpoints such as ModelScope's ``VQGAN_autoencoder.pth``.

``torch.load(weights_only=True)`` refuses those files because their pickle names Lightning callback classes and
numpy scalars. We only need ``checkpoint["state_dict"]``, so the unpickler below admits exactly what
``weights_only`` admits (tensors, storages, plain containers), turns the Lightning and numpy bookkeeping objects it
meets into inert stand-ins, and refuses every other global. Nothing in the file is ever executed, and neither
pytorch_lightning nor numpy needs to be importable.
"""

from __future__ import annotations

import pickle
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import _weights_only_unpickler

from cinematic.errors import CinematicError

# Module prefixes whose classes and functions become stand-ins instead of being imported.
_STAND_IN_PREFIXES = ("pytorch_lightning.", "lightning.", "lightning_fabric.", "numpy.", "omegaconf.")


class StandIn:
    """Inert replacement for a bookkeeping object: it records its arguments and state, and does nothing else."""

    qualname = "?"

    def __init__(self, *args: Any, **kwargs: Any):
        self.args, self.kwargs, self.state = args, kwargs, None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<stand-in for {self.qualname}>"

    # numpy scalars unpickle through a module-level function `numpy.core.multiarray.scalar(dtype, bytes)`;
    # the stand-in class is called the same way, so a plain call is all we need.


def _stand_in(qualname: str) -> type:
    return type("StandIn", (StandIn,), {"qualname": qualname})


class RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        qualname = f"{module}.{name}"
        allowed = _weights_only_unpickler._get_allowed_globals()
        if qualname in allowed:
            return allowed[qualname]
        if qualname.startswith(_STAND_IN_PREFIXES):
            return _stand_in(qualname)
        raise pickle.UnpicklingError(f"global {qualname} is not allowed")


class _PickleModule:
    """The shape of module ``torch.load`` expects as ``pickle_module``."""

    Unpickler = RestrictedUnpickler
    load = staticmethod(lambda f, **kw: RestrictedUnpickler(f, **kw).load())
    __name__ = "cinematic_restricted_pickle"


def load_checkpoint(path: Path) -> Any:
    """Load a Lightning-style ``.ckpt``/``.pth`` file without executing any pickled code."""
    try:
        # weights_only=False only because a custom pickle_module replaces torch's own restricted unpickler;
        # RestrictedUnpickler is at least as strict (see its find_class). Files in the pre-1.6 legacy format cannot
        # be memory-mapped: they are read whole, through the same unpickler.
        load = partial(torch.load, path, map_location="cpu", pickle_module=_PickleModule, weights_only=False)
        try:
            return load(mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return load()
    except pickle.UnpicklingError as e:
        raise CinematicError(f"refusing to load {path}: {e}; only tensors and plain containers are admitted") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CinematicError(f"cannot read {path}: {str(e).splitlines()[0]}") from None
