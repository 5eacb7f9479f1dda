"""Frame helpers shared by training data and inference inputs (an init video or image is fitted as a training clip
is)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def resize_and_crop(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 ``[F, h, w, 3]`` -> float32 ``[3, F, height, width]`` in [-1, 1]: scaled to cover, centre-cropped."""
    x = frames.permute(0, 3, 1, 2).float()  # [F,h,w,3] -> [F,3,h,w]
    h, w = x.shape[-2:]
    scale = max(height / h, width / w)
    size = (max(height, round(h * scale)), max(width, round(w * scale)))
    if size != (h, w):
        x = F.interpolate(x, size=size, mode="bilinear", antialias=scale < 1, align_corners=False)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    x = x[:, :, top : top + height, left : left + width]
    return (x / 127.5 - 1.0).clamp(-1, 1).permute(1, 0, 2, 3).contiguous()  # [F,3,H,W] -> [3,F,H,W]
