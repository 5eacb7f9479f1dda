"""FreeU and FreeInit: each is the identity when switched off, and changes only what it should."""

from __future__ import annotations

import math

import pytest
import torch

from cinematic.cli import main
from cinematic.diffusion import alpha_bar_scaled_linear
from cinematic.diffusion.freeinit import butterworth_lowpass, diffuse, free_init, mix_frequencies
from cinematic.models.freeu import FreeUConfig, freeu, low_frequency_mask, scale_backbone, scale_skip
from cinematic.models.unet3d import UNET_TINY, UNet3D
from cinematic.pipeline import Pipeline
from tests.factories import make_diffusers_folder

PROMPT = "a red cat riding a horse on the beach"
SMALL = dict(num_frames=3, height=32, width=32, steps=3, seed=4, progress=False)


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def unet() -> UNet3D:
    torch.manual_seed(0)
    return UNet3D(UNET_TINY).eval()


def unet_inputs():
    return randn(1, 4, 3, 12, 12, seed=1), torch.tensor([500.0]), randn(1, 5, 32, seed=2)


# --- FreeU --------------------------------------------------------------------------------------------------------


def test_freeu_with_unit_factors_is_the_identity(unet):
    x, t, context = unet_inputs()
    with torch.no_grad():
        plain = unet(x, t, context)
        with freeu(unet, FreeUConfig(b1=1, b2=1, s1=1, s2=1)):
            same = unet(x, t, context)
        with freeu(unet):
            changed = unet(x, t, context)
        after = unet(x, t, context)
    assert torch.equal(plain, same) and torch.equal(plain, after)  # the hooks come off with the context
    assert not torch.allclose(plain, changed)


def test_freeu_touches_only_the_decoder_inputs(unet):
    """Every module before the decoder sees exactly what it saw without FreeU; the first decoder layer does not."""
    x, t, context = unet_inputs()
    seen: dict[str, list[torch.Tensor]] = {}

    def record(name):
        def hook(module, args, output):
            seen.setdefault(name, []).append(args[0].detach().clone() if args else None)

        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in unet.named_modules() if n]
    try:
        with torch.no_grad():
            unet(x, t, context)
            with freeu(unet):
                unet(x, t, context)
    finally:
        for h in handles:
            h.remove()
    changed = {n for n, (a, b) in seen.items() if a is not None and not torch.equal(a, b)}
    assert "up_blocks.0.resnets.0" in changed and "up_blocks.1.resnets.0" in changed
    assert all(n.startswith(("up_blocks.", "conv_norm_out", "conv_out")) for n in changed), sorted(changed)


def test_backbone_scaling_is_structure_related_on_half_the_channels():
    h = randn(2, 8, 6, 6)
    out = scale_backbone(h, 1.4)
    assert torch.equal(out[:, 4:], h[:, 4:])
    ratio = out[:, :4] / h[:, :4]
    assert ratio.min() >= 1 - 1e-6 and ratio.max() <= 1.4 + 1e-6
    # alpha = b where the channel mean is largest, 1 where it is smallest, per frame
    mean = h.mean(1)
    for n in range(2):
        hi, lo = mean[n].argmax(), mean[n].argmin()
        torch.testing.assert_close(ratio[n, :, hi // 6, hi % 6], torch.full((4,), 1.4))
        torch.testing.assert_close(ratio[n, :, lo // 6, lo % 6], torch.ones(4))


def paper_fourier_filter(x: torch.Tensor, scale: float, radius: int = 1) -> torch.Tensor:
    """The paper's procedure, as a reference: scale the box around the centre of the shifted spectrum, keep the real
    part of the inverse."""
    spectrum = torch.fft.fftshift(torch.fft.fftn(x, dim=(-2, -1)), dim=(-2, -1))
    h, w = x.shape[-2:]
    spectrum[..., h // 2 - radius : h // 2 + radius, w // 2 - radius : w // 2 + radius] *= scale
    return torch.fft.ifftn(torch.fft.ifftshift(spectrum, dim=(-2, -1)), dim=(-2, -1)).real


@pytest.mark.parametrize("height, width", [(8, 10), (7, 5), (2, 2)])
def test_skip_scaling_damps_only_the_low_frequencies(height, width):
    skip = randn(2, 3, height, width)
    out = scale_skip(skip, 0.2)
    torch.testing.assert_close(out, paper_fourier_filter(skip, 0.2), atol=1e-5, rtol=1e-5)
    mask = low_frequency_mask(height, width, 1, 0.2, skip.device)
    torch.testing.assert_close(torch.fft.fft2(out), torch.fft.fft2(skip) * mask, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.mean((-2, -1)), 0.2 * skip.mean((-2, -1)), atol=1e-5, rtol=1e-5)  # DC times s
    assert mask[0, 0] == pytest.approx(0.2) and (mask >= 0.2 - 1e-6).all() and (mask <= 1).all()
    if height > 3 and width > 3:  # away from DC nothing changes
        assert (mask[2:-2] == 1).all() and (mask[:, 2:-2] == 1).all()
    assert scale_skip(skip, 1.0) is skip and scale_backbone(skip, 1.0) is skip


# --- FreeInit -----------------------------------------------------------------------------------------------------


def test_butterworth_gain_at_dc_and_cutoff():
    lowpass = butterworth_lowpass(8, 8, 8)  # 2 * fftfreq(8)[1] = 0.25: bin 1 is the cutoff on every axis
    assert lowpass[0, 0, 0] == 1.0
    for index in ((1, 0, 0), (0, 1, 0), (0, 0, 1), (0, 0, -1), (-1, 0, 0)):
        assert lowpass[index].item() == pytest.approx(0.5)
    assert lowpass[0, 0, 2].item() == pytest.approx(1 / (1 + 2**8))  # order 4: (d / d_s) ** 8
    assert lowpass[4, 4, 4].item() < 1e-6  # Nyquist
    # The temporal cutoff stretches the time axis alone.
    slow = butterworth_lowpass(8, 8, 8, temporal_cutoff=0.5)
    assert slow[2, 0, 0].item() == pytest.approx(0.5) and torch.equal(slow[0], lowpass[0])
    odd = butterworth_lowpass(5, 7, 9)
    assert odd[0, 0, 0] == 1.0 and odd.max() == 1.0


def test_mixed_noise_keeps_low_frequencies_of_one_and_high_of_the_other():
    low_source, high_source = randn(1, 4, 8, 8, 8, seed=3), randn(1, 4, 8, 8, 8, seed=4)
    lowpass = butterworth_lowpass(8, 8, 8)
    mixed = mix_frequencies(low_source, high_source, lowpass)
    spectrum = torch.fft.fftn(mixed, dim=(-3, -2, -1))
    a, b = (torch.fft.fftn(x, dim=(-3, -2, -1)) for x in (low_source, high_source))
    torch.testing.assert_close(spectrum, lowpass * a + (1 - lowpass) * b, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(mixed.mean((-3, -2, -1)), low_source.mean((-3, -2, -1)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(spectrum[..., 4, 4, 4], b[..., 4, 4, 4], atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(mix_frequencies(low_source, high_source, torch.ones(8, 8, 8)), low_source)
    torch.testing.assert_close(mix_frequencies(low_source, high_source, torch.zeros(8, 8, 8)), high_source)


def test_free_init_iterations():
    alpha_bar = alpha_bar_scaled_linear()
    noise = randn(1, 4, 4, 8, 8, seed=5)
    calls = []

    def run(n):
        calls.append(n)
        return torch.tanh(n) + 0.1 * len(calls)

    assert torch.equal(free_init(run, noise, 0, alpha_bar), torch.tanh(noise) + 0.1) and len(calls) == 1
    calls.clear()
    generator = torch.Generator().manual_seed(9)
    out = free_init(run, noise, 2, alpha_bar, generator)
    assert len(calls) == 3 and torch.equal(calls[0], noise)
    fresh = torch.randn(noise.shape, generator=torch.Generator().manual_seed(9))
    first = torch.tanh(noise) + 0.1
    expected = mix_frequencies(diffuse(first, noise, alpha_bar), fresh, butterworth_lowpass(4, 8, 8))
    torch.testing.assert_close(calls[1], expected)
    torch.testing.assert_close(out, torch.tanh(calls[2]) + 0.3)
    a = float(alpha_bar[-1])
    torch.testing.assert_close(diffuse(first, noise, alpha_bar), math.sqrt(a) * first + math.sqrt(1 - a) * noise)


# --- through the pipeline and the CLI -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_diffusers_folder(tmp_path_factory.mktemp("free") / "model")


@pytest.fixture(scope="module")
def ours(folder) -> Pipeline:
    return Pipeline.from_pretrained(folder)


def test_pipeline_switches(ours):
    plain = ours(PROMPT, **SMALL)
    assert torch.equal(ours(PROMPT, freeu=False, freeinit=0, **SMALL).frames, plain.frames)
    with_freeu = ours(PROMPT, freeu=True, **SMALL)
    with_freeinit = ours(PROMPT, freeinit=1, **SMALL)
    assert not torch.equal(with_freeu.frames, plain.frames) and with_freeu.metadata["freeu"] is True
    assert not torch.equal(with_freeinit.frames, plain.frames) and with_freeinit.metadata["freeinit"] == 1
    assert torch.equal(ours(PROMPT, **SMALL).frames, plain.frames)  # nothing stays switched on


def test_cli_flags(folder, tmp_path):
    out = tmp_path / "clip.mp4"
    quick = ["--num-inference-steps", "2", "--num-frames", "2", "--height", "32", "--width", "32", "--seed", "1"]
    args = ["generate", "a cat", "-o", str(out), "--model", str(folder), "--freeu", "--freeinit", "1", *quick]
    assert main(args) == 0
    assert out.exists()
