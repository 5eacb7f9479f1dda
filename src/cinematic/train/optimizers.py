"""The optimizer of a run: PyTorch's AdamW, or bitsandbytes' 8-bit AdamW (``--optimizer adamw8bit``).

8-bit AdamW keeps both moments in 8 bits with block-wise scales (Dettmers et al. 2022): 2 bytes of state per
trained parameter instead of 8, so a full fine-tune of the 1.41B-parameter UNet holds about 2.8 GB of optimizer state
instead of 11.3 GB (docs/training.md#memory). bitsandbytes runs it on CUDA devices only, and is not a dependency of
cinematic: ``pip install bitsandbytes`` on a GPU machine.
"""

from __future__ import annotations

from typing import Any

import torch

from cinematic.errors import CinematicError


def check_optimizer(name: str, device: torch.device) -> None:
    """Refuse, before anything is written, an optimizer that cannot run here."""
    if name != "adamw8bit":
        return
    if device.type != "cuda":
        raise CinematicError(
            f"--optimizer adamw8bit runs on CUDA devices only (bitsandbytes), not on {device.type}; use --optimizer "
            "adamw"
        )
    _bitsandbytes()


def _bitsandbytes() -> Any:
    try:
        import bitsandbytes
    except ImportError:
        raise CinematicError("--optimizer adamw8bit needs bitsandbytes: pip install bitsandbytes") from None
    return bitsandbytes


def build_optimizer(
    name: str, groups: list[dict[str, Any]], lr: float, betas: tuple[float, float], weight_decay: float
) -> torch.optim.Optimizer:
    if name == "adamw8bit":
        return _bitsandbytes().optim.AdamW8bit(groups, lr=lr, betas=betas, weight_decay=weight_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay)
