"""Winograd F(2x2, 3x3) convolution for 3x3, stride-1, padding-1 layers at inference on the CPU.

A 3x3 convolution computes each 2x2 block of outputs from a 4x4 block of inputs with 36 multiplications per
(input channel, output channel) pair; Winograd's minimal filtering algorithm (Lavin & Gray 2016, "Fast Algorithms
for Convolutional Neural Networks") does it with 16, after linear transforms of the input block (``B^T d B``) and of
the filter (``G g G^T``) that need only additions and halvings, and before an output transform (``A^T m A``). The
16 multiplications per block become 16 independent matrix products ``[tiles, C] x [C, K]``, which is where the time
goes, at 16/36 = 0.44 of the direct convolution's multiply-adds.

The transforms are sums and differences of strided views of a channels-last copy of the input; frames are processed
in chunks small enough for the transformed tiles to stay in the caches (and the extra memory small whatever the video
length). The filter transform is redone at every call (a few percent of the products' time at 16 frames): kept,
it would add 16/9 of every convolution's weights to the model's memory.

fp32 error is that of a direct convolution times a small constant (the transforms' entries are 0, +-1 and +-1/2);
``tests/test_winograd.py`` compares both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cinematic.models import modifications

# F(2x2, 3x3): B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]] (applied as _BT_ROWS below),
# A^T = [[1, 1, 1, 0], [0, 1, -1, -1]] (written out in conv3x3), and G:
_G = torch.tensor([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], dtype=torch.float64)

# Elements of transformed input tiles (16 x tiles x channels) processed at once: ~20 MB, so that a chunk's
# transforms and products stay in the caches. Measured on a 2-core EPYC (AVX2), 16 frames with guidance (32 images
# per call), against PyTorch's (oneDNN) direct convolution: 0.5-0.75x of its time for the UNet's layers (320
# channels at 32x32 to 1280 at 4x4, concatenated decoder inputs included); chunks 4x larger were 10-35% slower.
CHUNK_ELEMENTS = 5 * 2**20

# Where the transforms pay, measured as above (16 frames, guidance): from 256 channels on (0.5x at 512 channels
# 32x32, 0.81x at 256 channels 128x128); at 128 channels Winograd broke even at 64x64 and took 1.6x the time at
# 256x256, and at 32-64 channels (the shapes model) 2.6-6x. Layers narrower than MIN_CHANNELS stay direct, as do
# calls with fewer than MIN_MACS multiply-adds.
MIN_CHANNELS = 256
MIN_MACS = 10**8

# Rows of B^T (and A^T) as (first, sign, second) index pairs: row r of B^T d is d[first] + sign * d[second].
_BT_ROWS = ((0, -1, 2), (1, 1, 2), (2, -1, 1), (1, -1, 3))


def transform_weight(weight: torch.Tensor) -> torch.Tensor:
    """``G g G^T`` of every 3x3 filter: ``[K, C, 3, 3]`` -> ``[16, K, C]``, as one product ``[16, 9] x [9, K*C]``
    that writes the result in the layout the tile products read."""
    k, c = weight.shape[:2]
    g = _G.to(weight.device, weight.dtype)
    t = torch.einsum("ai,bj->abij", g, g).reshape(16, 9)
    return (t @ weight.reshape(k * c, 9).T).reshape(16, k, c)


def conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` for ``x: [N, C, H, W]`` and ``weight: [K, C, 3, 3]``, contiguous."""
    n, c, h, w = x.shape
    k = weight.shape[0]
    th, tw = (h + 1) // 2, (w + 1) // 2  # 2x2 output tiles; an odd size gets one extra row/column, cut at the end
    u = transform_weight(weight).transpose(1, 2)  # [16, C, K]
    # Channels last, so that every tile element below is a strided view with contiguous channels.
    padded = F.pad(x, (1, 1 + 2 * tw - w, 1, 1 + 2 * th - h)).permute(0, 2, 3, 1).contiguous()  # [N, H', W', C]
    out = torch.empty((n, 2 * th, 2 * tw, k), dtype=x.dtype, device=x.device)
    # Chunks of whole images, or of bands of tile rows where one image alone is larger than a chunk (the VAE's
    # 256x256 layers), so that the buffers below stay about CHUNK_ELEMENTS whatever the size.
    per_row = 16 * tw * max(c, k)
    band = max(1, min(th, CHUNK_ELEMENTS // per_row))
    chunk = max(1, min(n, CHUNK_ELEMENTS // (per_row * band))) if band == th else 1
    # Flat buffers, viewed per chunk at its own size (the last chunk may be smaller), so every view is contiguous.
    size = chunk * band * tw
    rows_buf = torch.empty(4 * size * c, dtype=x.dtype, device=x.device)
    v_buf = torch.empty(16 * size * c, dtype=x.dtype, device=x.device)
    prod_buf = torch.empty(16 * size * k, dtype=x.dtype, device=x.device)
    half_buf = torch.empty(8 * size * k, dtype=x.dtype, device=x.device)
    for first, r0 in ((f, r) for f in range(0, n, chunk) for r in range(0, th, band)):
        m, b = min(chunk, n - first), min(band, th - r0)
        count = m * b * tw
        part = padded[first : first + m, 2 * r0 : 2 * (r0 + b) + 2]
        d = [[part[:, i : i + 2 * b : 2, j : j + 2 * tw : 2] for j in range(4)] for i in range(4)]  # [m, b, tw, C]
        # V = B^T d B: rows of B^T combine the tile's rows, then its columns.
        rows = rows_buf[: 4 * count * c].view(4, m, b, tw, c)
        v = v_buf[: 16 * count * c].view(4, 4, m, b, tw, c)
        for a, (i0, sign_i, i1) in enumerate(_BT_ROWS):
            for j in range(4):
                torch.add(d[i0][j], d[i1][j], alpha=sign_i, out=rows[j])
            for col, (j0, sign_j, j1) in enumerate(_BT_ROWS):
                torch.add(rows[j0], rows[j1], alpha=sign_j, out=v[a, col])
        tiles = prod_buf[: 16 * count * k].view(16, count, k)
        torch.bmm(v.view(16, count, c), u, out=tiles)  # the 16 products [tiles, C] x [C, K]
        # Y = A^T M A, A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]: first over the tile's rows, then its columns.
        mm = tiles.view(4, 4, m, b, tw, k)
        half = half_buf[: 8 * count * k].view(2, 4, m, b, tw, k)
        torch.add(mm[0] + mm[1], mm[2], out=half[0])
        torch.sub(mm[1] - mm[2], mm[3], out=half[1])
        y = out[first : first + m, 2 * r0 : 2 * (r0 + b)]
        for p in range(2):
            hp = half[p]
            torch.add(hp[0] + hp[1], hp[2], out=y[:, p::2, 0::2])
            torch.sub(hp[1] - hp[2], hp[3], out=y[:, p::2, 1::2])
    result = torch.empty((n, k, h, w), dtype=x.dtype, device=x.device)
    cropped = out[:, :h, :w].permute(0, 3, 1, 2)
    if bias is None:
        result.copy_(cropped)
    else:
        torch.add(cropped, bias.view(1, k, 1, 1), out=result)
    return result


def eligible(conv: nn.Module, min_channels: int | None = None) -> bool:
    """A 3x3, stride-1, padding-1, dense Conv2d wide enough for the transforms to pay off."""
    return (
        isinstance(conv, nn.Conv2d)
        and type(conv).forward is nn.Conv2d.forward  # not a subclass with its own computation
        and conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and min(conv.in_channels, conv.out_channels) >= (MIN_CHANNELS if min_channels is None else min_channels)
    )


def worth_it(x: torch.Tensor, out_channels: int) -> bool:
    """Whether a call is large enough for the transforms' fixed costs to pay: at least :data:`MIN_MACS`
    multiply-adds in the direct convolution."""
    n, c, h, w = x.shape
    return n * c * h * w * out_channels * 9 >= MIN_MACS


def _forward(self: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The forward of a convolution that :func:`enable` switched: Winograd for large fp32 CPU inference calls, the
    class's own forward otherwise (training, autograd, other devices and dtypes, small calls)."""
    if (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.dim() == 4
        and not torch.is_grad_enabled()
        and worth_it(x, self.out_channels)
    ):
        return conv3x3(x, self.weight, self.bias)
    return type(self).forward(self, x)


def enable(module: nn.Module, min_channels: int | None = None) -> int:
    """Switch every eligible 3x3 convolution in ``module`` to Winograd (an instance attribute ``forward``; the
    parameters, their names and the class stay as they are, so weight loading, LoRA and ``compute_in`` are
    unaffected). Returns how many were switched.

    Recorded as one change (kind ``"winograd"``, :mod:`cinematic.models.modifications`) that :func:`disable` undoes.
    Graph-safe: the switch is the convolution's own forward, which a compiled forward traces; and it computes only on
    the CPU, where nothing is recorded as a CUDA graph.
    """
    # A convolution with a forward of its own already (switched before) is left to the change that switched it.
    convs = [conv for conv in module.modules() if eligible(conv, min_channels) and "forward" not in conv.__dict__]
    if not convs:
        return 0
    for conv in convs:
        conv.forward = _forward.__get__(conv)

    def restore() -> None:
        for conv in convs:
            del conv.forward  # the class's forward shows through again

    modifications.record(module, "winograd", f"{len(convs)} convolutions", restore, graph_safe=True)
    return len(convs)


def disable(module: nn.Module) -> None:
    """Undo every :func:`enable` of ``module`` and its submodules."""
    modifications.undo_all(module, "winograd")
