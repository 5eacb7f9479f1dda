"""Running networks in another precision than they are stored in.

- :func:`compute_in`: weights stay in their storage dtype (fp16 or bf16: half the memory) and every layer casts its
  weights to the compute dtype (fp32) when it runs, one layer at a time. For CPUs without fast half-precision
  arithmetic: the memory of half precision, the arithmetic of fp32. When the stored weights came from fp16 files
  (the published diffusers weights, cinematic's format) the results are those of the fp32 run, because fp32 holds
  every fp16 value exactly.
- :func:`quantize_int8`: dynamic int8 quantization of the Linear layers (weights int8 per channel, activations
  quantized per call), for CPU inference; it changes the results slightly.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.nn.utils import parametrize


class _Cast(nn.Module):
    """A parametrization: the stored tensor, cast to ``dtype`` on every access."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def forward(self, stored: torch.Tensor) -> torch.Tensor:
        return stored.to(self.dtype)


def compute_in(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Make every floating parameter of ``module`` read as ``dtype`` while it is stored as it is; in place.

    Uses ``torch.nn.utils.parametrize``: ``layer.weight`` becomes the cast of the stored tensor, computed at each
    access (inside the layer's forward), so only one layer's weights exist in ``dtype`` at a time. Parameters already
    in ``dtype`` are left alone. The state-dict keys of a cast parameter gain ``parametrizations.<name>.original``;
    this is a mode for inference, not for saving. (cinematic's networks have no floating buffers to cast.)
    """
    for sub in list(module.modules()):
        for name, param in list(sub.named_parameters(recurse=False)):
            if param.is_floating_point() and param.dtype != dtype:
                # Inference only: frozen, so that nothing (autograd, FlopCounterMode's module tracker) treats the
                # cast as a step of a graph to differentiate.
                param.requires_grad_(False)
                parametrize.register_parametrization(sub, name, _Cast(dtype), unsafe=True)
    return module


def storage_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a network's first floating parameter is stored in (under :func:`compute_in`, the stored one)."""
    for param in module.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float32


def quantize_int8(module: nn.Module) -> nn.Module:
    """Dynamic int8 quantization of every ``nn.Linear`` (``torch.ao.quantization.quantize_dynamic``), in place.

    Weights are quantized per output channel (less error than one scale per tensor: 0.12 against 0.13 relative
    error on the tiny test UNet with every parameter random), activations per call with one scale per tensor.
    CPU only, fp32 modules only. Convolutions, half of the UNet's FLOPs, stay fp32: PyTorch has no dynamic int8
    convolution.
    """
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():  # torch.ao.quantization announces its move to torchao on every call
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", UserWarning)
        return quantize_dynamic(module, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)
