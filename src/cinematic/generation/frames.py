"""Latents to frames: the VAE one chunk of frames at a time, then uint8 pixels."""

from __future__ import annotations

import torch


@torch.inference_mode()
def decode_frames(vae: torch.nn.Module, latents: torch.Tensor, dtype: torch.dtype, chunk: int) -> list[torch.Tensor]:
    """uint8 frames ``[F, H, W, 3]`` per video of ``latents`` ``[N, C, F, h, w]``: ``(x + 1) / 2``, clamped, rounded.
    ``chunk``: frames per VAE call. On the CPU one 256x256 frame at a time is no slower: the full model's 16 frames
    decoded in 55-63 s one by one and 62-67 s eight at a time, and eight at a time needed about 3 GB more (bench.py,
    2026-11-26). Small frames are another matter: the shapes model's 16 frames of 32x32 take 80 ms one by one and
    30 ms in one call, so the default chunk follows the frames' size (``memory.default_decode_chunk``)."""
    videos = vae.decode_video(latents.to(dtype), chunk=chunk).float()  # [N,3,F,H,W]
    pixels = ((videos + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8)
    return [v.permute(1, 2, 3, 0).contiguous().cpu() for v in pixels]  # [3,F,H,W] -> [F,H,W,3]
