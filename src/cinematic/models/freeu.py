"""FreeU (Si et al., "FreeU: Free Lunch in Diffusion U-Net", CVPR 2024): re-weight what the decoder reads.

At every concatenation ``[h, skip]`` of the two deepest decoder levels (level i = 0, 1 with factors ``b_i``,
``s_i``):

- backbone scaling (the paper's structure-related form, sec. 3.2): the first half of ``h``'s channels is multiplied
  by ``alpha = (b - 1) * m + 1``, where ``m`` is the channel mean of ``h`` min-max normalised per frame to [0, 1];
  so the denoising backbone is amplified where the features are strong;
- skip scaling: the skip's 2-D spectrum inside the low-frequency box of radius ``r = 1`` around DC is multiplied
  by ``s``, damping the skip's low frequencies so the backbone's semantics dominate.

Nothing is retrained. It acts through forward pre-hooks on the decoder resnets, which receive exactly ``cat([h,
skip])``, so the UNet's weights are untouched; :func:`apply` records the hooks as one change
(:mod:`cinematic.models.modifications`, not safe for a compiled or recorded forward, which would not run them), and
undoing it takes them off. ``b = 1`` and ``s = 1``
are skipped rather than computed, so they are the identity exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cinematic.models import modifications


@dataclass(frozen=True)
class FreeUConfig:
    """Factors for decoder levels 0 (deepest) and 1; defaults are the published ones for video models."""

    b1: float = 1.2
    b2: float = 1.4
    s1: float = 0.9
    s2: float = 0.2
    radius: int = 1  # half-width of the low-frequency box, in frequency bins


FREEU_VIDEO = FreeUConfig()


def scale_backbone(h: Tensor, b: float) -> Tensor:
    """``h`` ``[N, C, H, W]`` with its first ``C // 2`` channels times ``(b - 1) * m + 1`` (see module docstring)."""
    if b == 1.0:
        return h
    mean = h.float().mean(dim=1, keepdim=True)  # [N,C,H,W] -> [N,1,H,W]
    low = mean.amin(dim=(-2, -1), keepdim=True)
    high = mean.amax(dim=(-2, -1), keepdim=True)
    m = (mean - low) / (high - low).clamp_min(torch.finfo(torch.float32).tiny)
    alpha = ((b - 1.0) * m + 1.0).to(h.dtype)
    half = h.shape[1] // 2
    return torch.cat([h[:, :half] * alpha, h[:, half:]], dim=1)


def low_frequency_mask(height: int, width: int, radius: int, scale: float, device: torch.device) -> Tensor:
    """``[H, W]`` float32 multiplier on an unshifted FFT, symmetric so that the filtered skip stays real.

    The paper scales the box ``[c - r, c + r)`` around the centre ``c`` of the shifted spectrum, i.e. frequency
    offsets ``-r .. r - 1`` from DC, and keeps the real part of the inverse transform. That box is half a bin off
    centre, and taking the real part averages any mask with its mirror image ``k -> -k``; so that average is the
    filter it applies, and the one built here: ``scale`` at DC, ``(1 + scale) / 2`` where only one of a bin and its
    mirror lies in the box, 1 elsewhere.
    """

    def near_dc(n: int) -> Tensor:
        k = torch.fft.fftfreq(n, d=1.0 / n, device=device)  # integer bin offsets from DC: 0, 1, ..., -1
        return (k >= -radius) & (k < radius)

    box = (near_dc(height)[:, None] & near_dc(width)[None, :]).float()
    mirror = box.flip(0, 1).roll((1, 1), (0, 1))  # mirror[i, j] = box[-i mod H, -j mod W]
    return 1.0 + (scale - 1.0) * (box + mirror) / 2


def scale_skip(skip: Tensor, s: float, radius: int = 1) -> Tensor:
    """``skip`` ``[N, C, H, W]`` with its spatial low frequencies times ``s``; computed in float32."""
    if s == 1.0:
        return skip
    h, w = skip.shape[-2:]
    spectrum = torch.fft.fft2(skip.float())  # over the last two dims
    spectrum = spectrum * low_frequency_mask(h, w, radius, s, skip.device)
    return torch.fft.ifft2(spectrum).real.to(skip.dtype)  # real up to rounding: the mask is symmetric


def _hook(backbone_channels: int, b: float, s: float, radius: int):
    def pre_hook(module: nn.Module, args: tuple) -> tuple:
        x, *rest = args
        h, skip = x[:, :backbone_channels], x[:, backbone_channels:]  # [N, C_h + C_skip, H, W]
        return (torch.cat([scale_backbone(h, b), scale_skip(skip, s, radius)], dim=1), *rest)

    return pre_hook


def apply(unet: nn.Module, config: FreeUConfig = FREEU_VIDEO) -> modifications.Modification:
    """Make ``unet`` (a :class:`~cinematic.models.unet3d.UNet3D`) run with FreeU until the change is undone.

    Decoder layer j of a level reads ``cat([h, skip])``: ``h`` is the previous level's output for j = 0 (the
    middle block's width for the deepest level) and this level's own width after that.
    """
    widths = [level.channels for level in reversed(unet.config.levels)]  # decoder order, deepest first
    factors = [(config.b1, config.s1), (config.b2, config.s2)]
    handles = []
    for i, (block, (b, s)) in enumerate(zip(unet.up_blocks, factors)):
        for j, resnet in enumerate(block.resnets):
            backbone = widths[max(i - 1, 0)] if j == 0 else widths[i]
            handles.append(resnet.register_forward_pre_hook(_hook(backbone, b, s, config.radius)))

    def remove() -> None:
        for handle in handles:
            handle.remove()

    return modifications.record(unet, "freeu", repr(config), remove, graph_safe=False)


@contextmanager
def freeu(unet: nn.Module, config: FreeUConfig | None = FREEU_VIDEO) -> Iterator[None]:
    """Within the context, ``unet`` runs with FreeU (see :func:`apply`); ``None`` is off."""
    with modifications.applied(unet, None if config is None else apply(unet, config)):
        yield
