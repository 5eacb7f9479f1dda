"""A model loaded for generation: the networks in the dtype they compute in, with the CPU's fast convolutions."""

from __future__ import annotations

from pathlib import Path

import torch

from cinematic.errors import CinematicError
from cinematic.models import winograd
from cinematic.models.components import Model
from cinematic.models.precision import compute_in, quantize_int8
from cinematic.weights import build_networks, load, open_source
from cinematic.weights.files import load_into, stored_dtype

HALF = {"float16": torch.float16, "bfloat16": torch.bfloat16}
LEAN_BYTES = 2**30  # float32 weights above this stay in their files' half precision on a CPU


def default_dtypes(model: str | Path, device: torch.device, variant: str | None = None) -> tuple[torch.dtype, ...]:
    """``(stored, computed)`` when the caller names neither. On a GPU, float16 both. On a CPU, the networks compute in
    float32, which CPUs run fastest, and the weights of a large model (over :data:`LEAN_BYTES` in float32) stay in
    the precision of their files when those are half precision: half the memory, and from float16 files the same
    video as a float32 load, since every weight is cast to float32 exactly where it is used. A small model (the
    shapes model: 6 MB) is held in float32, where the casts would cost more time (2.1x a step) than they save. Only
    safetensors files are asked (their header is read, nothing else): pickled ``.bin``/``.pth`` files load as
    float32, as before."""
    if device.type != "cpu":
        return torch.float16, torch.float16
    source = open_source(model, variant=variant)
    c = source.config
    parameters = c.unet.parameter_count() + c.text_encoder.parameter_count() + c.vae.parameter_count()
    path = source.files["unet"]
    if 4 * parameters < LEAN_BYTES:
        return torch.float32, torch.float32
    if not (path.suffix == ".safetensors" or path.name.endswith(".safetensors.index.json")):
        return torch.float32, torch.float32
    return HALF.get(stored_dtype(path), torch.float32), torch.float32


def resolve_dtypes(
    model: str | Path,
    device: torch.device,
    dtype: torch.dtype | None,
    compute_dtype: torch.dtype | None,
    variant: str | None,
    changes_weights: bool,
) -> tuple[torch.dtype, torch.dtype]:
    """``(stored, computed)`` from what the caller named: without ``dtype``, :func:`default_dtypes`, except that a
    load that changes the weights themselves (``changes_weights``: int8, merged LoRAs) stores them as computed;
    ``compute_dtype`` defaults to the stored dtype."""
    if dtype is None:
        dtype, default_compute = default_dtypes(model, device, variant)
        compute_dtype = compute_dtype or default_compute
        if changes_weights:
            dtype = compute_dtype
    return dtype, compute_dtype or dtype


def load_model(
    model: str | Path,
    device: torch.device,
    dtype: torch.dtype,
    compute_dtype: torch.dtype,
    tokenizer: str | Path | None = None,
    variant: str | None = None,
    int8: bool = False,
    use_winograd: bool = True,
) -> Model:
    """The networks of ``model``, stored in ``dtype`` and computing in ``compute_dtype``; ``int8`` quantizes the
    UNet's Linear layers (CPU, fp32 compute only); ``use_winograd`` runs the large 3x3 convolutions of the UNet and
    VAE with Winograd's F(2x2, 3x3) on the CPU in fp32 (:mod:`cinematic.models.winograd`)."""
    if int8 and (device.type != "cpu" or compute_dtype != torch.float32):
        raise CinematicError("int8 runs on the CPU with float32 compute only; allowed: --device cpu --compute fp32")
    loaded = load(model, device=device, dtype=dtype, tokenizer=tokenizer, variant=variant)
    if compute_dtype != dtype:
        for network in (loaded.unet, loaded.text_encoder, loaded.vae):
            compute_in(network, compute_dtype)
    if int8:
        quantize_int8(loaded.unet)
    if use_winograd and device.type == "cpu" and compute_dtype == torch.float32:
        for network in (loaded.unet, loaded.vae):
            winograd.enable(network)
    return loaded


def load_text_encoder(
    model: str | Path, device: torch.device, dtype: torch.dtype, compute_dtype: torch.dtype, variant: str | None
) -> torch.nn.Module:
    """The text encoder of ``model`` alone, as :func:`load_model` loads it (to load it again after it was freed)."""
    source = open_source(model, variant=variant)
    network = build_networks(source.config)["text_encoder"]
    load_into(network, source.readers["text_encoder"](dtype), f"{source.files['text_encoder']}", dtype, device)
    if compute_dtype != dtype:
        compute_in(network, compute_dtype)
    return network.eval()
