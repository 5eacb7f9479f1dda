"""VAE parity against diffusers 0.42.1 ``AutoencoderKL`` and modelscope 1.40.2 ``AutoencoderKL``, plus the
frame-folding and chunking invariants of ``encode_video`` / ``decode_video``."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

from cinematic.errors import CinematicError
from cinematic.models.vae import VAE, VAE_FULL, VAE_TINY, VAEConfig
from cinematic.weights.ldm_vae import convert_ldm_vae, strip_first_stage

# The ddconfig ModelScope hard-codes for text-to-video-ms-1.7b (reference-model.md §4).
MS_DDCONFIG = {
    "double_z": True,
    "z_channels": 4,
    "resolution": 256,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 128,
    "ch_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_resolutions": [],
    "dropout": 0.0,
}
# Frames are independent, but CPU conv kernels (oneDNN) block the work differently for different batch sizes, so
# a chunk of 1 and a chunk of 6 differ by float32 rounding (seen: up to 3e-7 absolute).
BATCH_SIZE_TOL = {"rtol": 1e-5, "atol": 1e-6}


@torch.no_grad()
def _randomize(module: torch.nn.Module) -> torch.nn.Module:
    """Random weights everywhere, so that no path (bias, norm affine, shortcut) is trivially zero or one."""
    for p in module.parameters():
        p.copy_(torch.randn_like(p) * 0.1)
    return module.eval()


def _diffusers_vae(config: VAEConfig):
    from diffusers import AutoencoderKL

    n = len(config.block_out_channels)
    return AutoencoderKL(
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=config.block_out_channels,
        layers_per_block=config.layers_per_block,
        latent_channels=config.latent_channels,
        norm_num_groups=config.norm_groups,
        scaling_factor=config.scaling_factor,
    )


def _modelscope_vae(ddconfig: dict):
    from modelscope.models.multi_modal.video_synthesis.autoencoder import AutoencoderKL

    # ckpt_path defaults to None, so the constructor loads nothing; embed_dim equals z_channels as in ModelScope.
    return AutoencoderKL(ddconfig, embed_dim=ddconfig["z_channels"])


def _shapes(state_dict: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state_dict.items()}


@pytest.mark.parametrize(
    ("config", "size"),
    [
        (VAEConfig(block_out_channels=(32, 64), norm_groups=16), (32, 32)),
        (VAEConfig(block_out_channels=(16, 32, 32), layers_per_block=1, norm_groups=8), (24, 40)),
    ],
)
@torch.no_grad()
def test_matches_diffusers(tmp_path, config, size):
    reference = _randomize(_diffusers_vae(config))
    reference.save_pretrained(tmp_path)
    with torch.device("meta"):
        ours = VAE(config)
    ours.load_state_dict(load_file(tmp_path / "diffusion_pytorch_model.safetensors"), strict=True, assign=True)
    ours.eval()

    images = torch.randn(2, 3, *size)
    posterior = reference.encode(images).latent_dist
    mean, logvar = ours.encode(images)
    assert_close(mean, posterior.mean, rtol=1e-5, atol=1e-5)
    assert_close(logvar, posterior.logvar, rtol=1e-5, atol=1e-5)

    z = torch.randn_like(mean)
    assert_close(ours.decode(z), reference.decode(z).sample, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_matches_modelscope_through_lightning_checkpoint():
    # ModelScope's Normalize hard-codes 32 groups, so the tiny widths are multiples of 32.
    ddconfig = dict(MS_DDCONFIG, resolution=32, ch=32, ch_mult=[1, 2, 2], num_res_blocks=1)
    reference = _randomize(_modelscope_vae(ddconfig))
    checkpoint = {
        "state_dict": {f"first_stage_model.{k}": v for k, v in reference.state_dict().items()}
        | {"model.diffusion_model.x.weight": torch.zeros(2), "cond_stage_model.y.weight": torch.zeros(2)},
        "epoch": 3,
        "global_step": 10,
    }
    with torch.device("meta"):
        ours = VAE(VAEConfig(block_out_channels=(32, 64, 64), layers_per_block=1, norm_groups=32))
    ours.load_state_dict(convert_ldm_vae(strip_first_stage(checkpoint["state_dict"])), strict=True, assign=True)
    ours.eval()

    images = torch.randn(2, 3, 32, 32)
    posterior = reference.encode(images)
    mean, logvar = ours.encode(images)
    assert_close(mean, posterior.mean, rtol=1e-5, atol=1e-5)
    assert_close(logvar, posterior.logvar, rtol=1e-5, atol=1e-5)

    z = torch.randn_like(mean)
    assert_close(ours.decode(z), reference.decode(z), rtol=1e-5, atol=1e-5)


@pytest.fixture
def tiny() -> VAE:
    return _randomize(VAE(VAE_TINY))


@torch.no_grad()
def test_decode_video_folds_batch_major_and_ignores_chunk(tiny):
    b, f = 2, 3
    latents = torch.randn(b, 4, f, 2, 3)
    video = tiny.decode_video(latents, chunk=b * f)
    assert video.shape == (b, 3, f, 16, 24)
    assert_close(tiny.decode_video(latents, chunk=1), video, **BATCH_SIZE_TOL)
    for i in range(b):
        for j in range(f):
            frame = tiny.decode(latents[i, :, j][None] / VAE_TINY.scaling_factor)[0]
            assert_close(video[i, :, j], frame, **BATCH_SIZE_TOL)


@torch.no_grad()
def test_encode_video_folds_batch_major_and_samples_like_diffusers(tiny):
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    b, f = 2, 3
    video = torch.randn(b, 3, f, 16, 24).clamp(-1, 1)
    latents = tiny.encode_video(video, chunk=b * f, generator=torch.Generator().manual_seed(7))
    assert latents.shape == (b, 4, f, 2, 3)
    chunked = tiny.encode_video(video, chunk=1, generator=torch.Generator().manual_seed(7))
    assert_close(chunked, latents, **BATCH_SIZE_TOL)

    # What diffusers' VideoToVideoSDPipeline.prepare_latents does: fold (b, f) into the batch, one posterior,
    # `latent_dist.sample(generator)`, scale, unfold.
    frames = video.permute(0, 2, 1, 3, 4).reshape(b * f, 3, 16, 24)
    posterior = DiagonalGaussianDistribution(torch.cat(tiny.encode(frames), dim=1))
    expected = VAE_TINY.scaling_factor * posterior.sample(torch.Generator().manual_seed(7))
    expected = expected.reshape(b, f, 4, 2, 3).permute(0, 2, 1, 3, 4)
    assert_close(latents, expected, rtol=0, atol=0)

    mean = tiny.encode_video(video, sample=False)
    for i in range(b):
        for j in range(f):
            frame_mean, _ = tiny.encode(video[i, :, j][None])
            assert_close(mean[i, :, j], VAE_TINY.scaling_factor * frame_mean[0], **BATCH_SIZE_TOL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_runs_in_half_precision(tiny, dtype):
    latents = torch.randn(1, 4, 2, 2, 2)
    expected = tiny.decode_video(latents)
    video = tiny.to(dtype).decode_video(latents)
    assert video.dtype == dtype
    # Half precision keeps ~3 significant digits; 2e-2 leaves room for the error accumulated over ~20 layers.
    assert_close(video.float(), expected, rtol=2e-2, atol=2e-2)
    assert tiny.encode_video(video.float().clamp(-1, 1), generator=torch.Generator().manual_seed(0)).dtype == dtype


def test_gradient_checkpointing_gives_the_same_gradients(tiny):
    images = torch.randn(1, 3, 16, 16)

    def grads() -> list[torch.Tensor]:
        tiny.zero_grad()
        tiny.decode(tiny.encode(images)[0]).square().mean().backward()
        return [p.grad.clone() for p in tiny.parameters()]

    plain = grads()
    tiny.gradient_checkpointing = True
    assert tiny.encoder.gradient_checkpointing and tiny.decoder.gradient_checkpointing
    assert_close(grads(), plain, rtol=1e-5, atol=1e-6)


def test_full_size_keys_match_diffusers_and_modelscope():
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        ours = _shapes(VAE(VAE_FULL).state_dict())
        published = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
            norm_num_groups=32,
            sample_size=512,
        )
        modelscope = _modelscope_vae(MS_DDCONFIG).state_dict()
    assert len(ours) == 248
    assert sum(torch.Size(s).numel() for s in ours.values()) == 83_653_863
    assert ours == _shapes(published.state_dict())
    assert _shapes(convert_ldm_vae(modelscope)) == ours


def test_converter_rejects_unknown_keys_and_bad_shapes():
    weight = torch.zeros(8, 8, 1, 1)
    with pytest.raises(CinematicError, match=r"encoder\.down\.0\.attn\.0\.q\.weight"):
        convert_ldm_vae({"quant_conv.weight": weight, "encoder.down.0.attn.0.q.weight": weight})
    with pytest.raises(CinematicError, match=r"loss\.logvar"):
        convert_ldm_vae({"loss.logvar": torch.zeros(())})
    with pytest.raises(CinematicError, match=r"decoder\.mid\.attn_1\.q\.weight"):
        convert_ldm_vae({"decoder.mid.attn_1.q.weight": torch.zeros(8, 8, 3, 3)})
    with pytest.raises(CinematicError, match="first_stage_model"):
        strip_first_stage({"model.diffusion_model.x": weight})


def test_config_is_validated():
    with pytest.raises(CinematicError, match="norm_groups"):
        dataclasses.replace(VAE_FULL, block_out_channels=(128, 250))
    with pytest.raises(CinematicError, match="layers_per_block"):
        dataclasses.replace(VAE_FULL, layers_per_block=0)
    with pytest.raises(CinematicError, match="chunk"):
        VAE(VAE_TINY).decode_video(torch.zeros(1, 4, 1, 2, 2), chunk=0)
    assert VAE_FULL.downsample_factor == VAE_TINY.downsample_factor == 8
