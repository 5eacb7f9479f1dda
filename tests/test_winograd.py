"""Winograd F(2x2, 3x3) convolutions (cinematic.models.winograd): the same function as PyTorch's, to fp32 rounding,
and switched on only where they are meant to run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cinematic.models import winograd
from cinematic.models.unet3d import UNET_TINY, UNet3D
from cinematic.pipeline import Pipeline
from tests.test_fast_modes import fp16_stored
from tests.test_unet3d import inputs, randomize_

SHAPES = [  # N, C, K, H, W: even and odd sizes, one pixel, channel counts that are not multiples of anything
    (3, 8, 5, 6, 6),
    (2, 4, 7, 7, 5),
    (1, 3, 3, 1, 1),
    (6, 33, 17, 9, 12),
    (2, 256, 320, 4, 4),  # as wide as the layers it runs on
]


def relative_error(result: torch.Tensor, reference: torch.Tensor) -> float:
    return ((result.double() - reference).abs().max() / reference.abs().max()).item()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_winograd_equals_the_direct_convolution_to_fp32_rounding(shape, with_bias):
    n, c, k, h, w = shape
    x, weight = torch.randn(n, c, h, w), torch.randn(k, c, 3, 3)
    bias = torch.randn(k) if with_bias else None
    exact = F.conv2d(x.double(), weight.double(), None if bias is None else bias.double(), padding=1)
    direct = F.conv2d(x, weight, bias, padding=1)
    result = winograd.conv3x3(x, weight, bias)
    assert result.shape == direct.shape and result.dtype == torch.float32 and result.is_contiguous()
    # F(2x2, 3x3)'s transforms add a few roundings; its error stays within a small multiple of the direct one's.
    assert relative_error(result, exact) <= max(4 * relative_error(direct, exact), 1e-6)


def test_frame_chunks_give_the_unchunked_result(monkeypatch):
    x, weight, bias = torch.randn(7, 16, 6, 10), torch.randn(12, 16, 3, 3), torch.randn(12)
    whole = winograd.conv3x3(x, weight, bias)
    monkeypatch.setattr(winograd, "CHUNK_ELEMENTS", 1)  # one frame per chunk; the last chunk is not a full one
    torch.testing.assert_close(winograd.conv3x3(x, weight, bias), whole, rtol=0, atol=0)
    monkeypatch.setattr(winograd, "CHUNK_ELEMENTS", 16 * 3 * 5 * 16 * 3)  # three frames per chunk: 3 + 3 + 1
    torch.testing.assert_close(winograd.conv3x3(x, weight, bias), whole, rtol=0, atol=0)


def test_row_bands_give_the_unbanded_result(monkeypatch):
    # An image larger than a chunk is done in bands of tile rows (the VAE's 256x256 layers); 9 rows = 5 tile rows.
    x, weight, bias = torch.randn(2, 16, 9, 10), torch.randn(12, 16, 3, 3), torch.randn(12)
    whole = winograd.conv3x3(x, weight, bias)
    monkeypatch.setattr(winograd, "CHUNK_ELEMENTS", 16 * 5 * 16 * 2)  # bands of two tile rows: 2 + 2 + 1
    torch.testing.assert_close(winograd.conv3x3(x, weight, bias), whole, rtol=0, atol=0)


def test_enable_switches_only_plain_3x3_stride_1_convolutions(monkeypatch):
    class LoRAConv(nn.Conv2d):  # a subclass with a computation of its own is left alone
        def forward(self, x):
            return super().forward(x) * 2

    monkeypatch.setattr(winograd, "MIN_CHANNELS", 32)
    net = nn.Sequential(
        nn.Conv2d(32, 32, 3, padding=1),  # switched
        nn.Conv2d(32, 32, 3, stride=2, padding=1),
        nn.Conv2d(32, 32, 1),
        nn.Conv2d(32, 32, 3, padding=1, groups=2),
        nn.Conv2d(4, 32, 3, padding=1),  # too narrow
        LoRAConv(32, 32, 3, padding=1),
    )
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert winograd.enable(net) == 1
    assert "forward" in net[0].__dict__ and all("forward" not in m.__dict__ for m in net[1:])
    assert net.state_dict().keys() == before.keys()
    winograd.disable(net)
    assert all("forward" not in m.__dict__ for m in net)


def test_a_switched_layer_runs_winograd_only_for_large_fp32_inference_calls(monkeypatch):
    monkeypatch.setattr(winograd, "MIN_MACS", 10**7)
    conv = nn.Conv2d(32, 32, 3, padding=1)
    winograd.enable(conv, min_channels=32)
    calls = []
    real = winograd.conv3x3
    monkeypatch.setattr(winograd, "conv3x3", lambda *a: calls.append(1) or real(*a))
    big, small = torch.randn(8, 32, 16, 16), torch.randn(1, 32, 2, 2)
    assert winograd.worth_it(big, 32) and not winograd.worth_it(small, 32)
    direct = F.conv2d(big, conv.weight, conv.bias, padding=1)
    with torch.no_grad():
        torch.testing.assert_close(conv(big), direct, rtol=1e-5, atol=1e-5)
        assert len(calls) == 1
        torch.testing.assert_close(conv(small), F.conv2d(small, conv.weight, conv.bias, padding=1), rtol=0, atol=0)
        assert len(calls) == 1
        conv.double()  # another dtype: PyTorch's convolution
        torch.testing.assert_close(conv(big.double()), F.conv2d(big.double(), conv.weight, conv.bias, padding=1))
        assert len(calls) == 1
        conv.float()
    out = conv(big)  # autograd (training): the direct convolution, so gradients are PyTorch's
    assert len(calls) == 1 and out.requires_grad
    torch.testing.assert_close(out, direct, rtol=0, atol=0)


def test_the_unet_with_winograd_equals_the_plain_unet(monkeypatch):
    monkeypatch.setattr(winograd, "MIN_MACS", 0)  # the tiny UNet's calls are all small: switch every one
    torch.manual_seed(0)
    plain = randomize_(UNet3D(UNET_TINY)).eval()
    fast = UNet3D(UNET_TINY).eval()
    fast.load_state_dict(plain.state_dict())
    assert winograd.enable(fast, min_channels=1) > 0
    x, t, context = inputs(UNET_TINY, 2, 3, 10, 6)
    with torch.no_grad():
        expected, result = plain(x, t, context), fast(x, t, context)
    assert relative_error(result, expected.double()) < 1e-5


def test_winograd_reads_fp16_stored_weights_through_their_fp32_casts(monkeypatch):
    """compute_in's parametrized convolutions are switched too, and give the fp32 network's result exactly."""
    monkeypatch.setattr(winograd, "MIN_MACS", 0)
    torch.manual_seed(0)
    rounded, stored = fp16_stored(randomize_(UNet3D(UNET_TINY)))
    assert winograd.enable(rounded, min_channels=1) == winograd.enable(stored, min_channels=1) > 0
    x, t, context = inputs(UNET_TINY, 2, 3, 10, 6)
    with torch.no_grad():
        torch.testing.assert_close(stored(x, t, context), rounded(x, t, context), rtol=0, atol=0)


def test_pipelines_switch_winograd_on_cpu_fp32_unless_told_not_to(monkeypatch):
    monkeypatch.setattr(winograd, "MIN_CHANNELS", 32)  # the shapes model is narrower than the layers it pays on

    def switched(pipe: Pipeline) -> int:
        return sum("forward" in m.__dict__ for m in [*pipe.model.unet.modules(), *pipe.model.vae.modules()])

    assert switched(Pipeline.from_pretrained("shapes")) > 0
    assert switched(Pipeline.from_pretrained("shapes", winograd=False)) == 0
    assert switched(Pipeline.from_pretrained("shapes", dtype=torch.bfloat16)) == 0  # bf16 compute: PyTorch's
