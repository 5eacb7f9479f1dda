"""Fast and lean modes: feature caching across steps, guidance truncation, fp16 storage with fp32 compute, freeing the
text encoder, int8 Linear layers, and the CPU step levers (the temporal conv as a 2-D conv). Each is checked against
the plain path it replaces."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from cinematic.cli import main
from cinematic.diffusion import TruncatedGuidance, classifier_free_guidance, guided_steps, sample
from cinematic.errors import CinematicError
from cinematic.models import precision
from cinematic.models.feature_cache import DeepCache, caching
from cinematic.models.precision import compute_in, quantize_int8, storage_dtype
from cinematic.models.unet3d import UNET_TINY, UNet3D
from cinematic.models.unet3d_blocks import FrameConv
from cinematic.pipeline import Pipeline
from tests.factories import make_diffusers_folder, randomize_zero_params
from tests.test_unet3d import inputs, randomize_

PROMPT = "a red cat riding a horse on the beach"
SMALL = dict(num_frames=3, height=32, width=32)
EXACT = {"rtol": 0, "atol": 0}


@pytest.fixture(scope="module")
def unet() -> UNet3D:
    torch.manual_seed(0)
    return randomize_(UNet3D(UNET_TINY))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_diffusers_folder(tmp_path_factory.mktemp("fast") / "model")


@pytest.fixture(scope="module")
def fp16_folder(tmp_path_factory):
    return make_diffusers_folder(tmp_path_factory.mktemp("fast16") / "model", variant="fp16")


@pytest.fixture(scope="module")
def pipe(folder) -> Pipeline:
    return Pipeline.from_pretrained(folder)


@contextlib.contextmanager
def batches_of(module: torch.nn.Module, frames: int = 1) -> Iterator[list[int]]:
    """The batch size of every call of ``module`` while the block runs (divided by ``frames`` for the layers inside
    the UNet, which see frames folded into the batch)."""
    seen: list[int] = []
    handle = module.register_forward_pre_hook(lambda _, args: seen.append(args[0].shape[0] // frames))
    try:
        yield seen
    finally:
        handle.remove()


# --- feature caching (DeepCache) -------------------------------------------------------------------------------------


def run_steps(unet: UNet3D, cache: DeepCache | None, xs, ts, context) -> list[torch.Tensor]:
    outs = []
    with torch.no_grad():
        for x, t in zip(xs, ts):
            if cache is not None:
                cache.next_step()
            with caching(unet, cache):
                outs.append(unet(x, t, context))
    return outs


def step_inputs(n: int = 4) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    x, _, context = inputs(UNET_TINY, 2, 3, 10, 6)
    xs = [x + 0.1 * i * torch.randn_like(x) for i in range(n)]
    ts = [torch.tensor([900 - 100 * i] * 2) for i in range(n)]
    return xs, ts, context


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_cache_interval_one_is_the_plain_computation(unet, depth):
    xs, ts, context = step_inputs()
    plain = run_steps(unet, None, xs, ts, context)
    cache = DeepCache(interval=1, depth=depth)
    cached = run_steps(unet, cache, xs, ts, context)
    for a, b in zip(cached, plain):
        torch.testing.assert_close(a, b, **EXACT)
    assert (cache.full_calls, cache.cached_calls) == (4, 0)


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_cached_steps_reuse_the_deep_features_of_the_last_full_step(unet, depth):
    xs, ts, context = step_inputs(5)
    cache = DeepCache(interval=3, depth=depth)
    with batches_of(unet.mid_block) as mid:
        cached = run_steps(unet, cache, xs, ts, context)
    assert len(mid) == 2  # steps 0 and 3 only: the bottleneck never runs on cached steps
    assert (cache.full_calls, cache.cached_calls) == (2, 3)
    plain = run_steps(unet, None, xs, ts, context)
    for i in (0, 3):  # full steps: the plain computation of their own input
        torch.testing.assert_close(cached[i], plain[i], **EXACT)

    # A cached step equals the plain forward whose decoder level -depth is fed the full step's deep features.
    boundary = unet.up_blocks[len(unet.up_blocks) - depth]
    remembered = []
    hook = boundary.register_forward_pre_hook(lambda _, args: remembered.append(args[0]))
    with torch.no_grad():
        unet(xs[0], ts[0], context)
    hook.remove()
    hook = boundary.register_forward_pre_hook(lambda _, args: (remembered[0], *args[1:]))
    with torch.no_grad():
        expected = [unet(xs[i], ts[i], context) for i in (1, 2)]
    hook.remove()
    for actual, want in zip(cached[1:3], expected):
        torch.testing.assert_close(actual, want, **EXACT)
    assert not torch.equal(cached[1], plain[1])  # and it is an approximation, not the plain result


def test_cache_runs_whole_when_the_context_or_batch_changes(unet):
    xs, ts, context = step_inputs(2)
    cache = DeepCache(interval=2)
    run_steps(unet, cache, xs[:1], ts[:1], context)
    other = torch.randn_like(context)
    with torch.no_grad():
        cache.next_step()  # a cached step, but with a context no full step has seen
        with caching(unet, cache):
            changed = unet(xs[1], ts[1], other)
            one = unet(xs[1][:1], ts[1][:1], context[:1])  # and a smaller batch
        torch.testing.assert_close(changed, unet(xs[1], ts[1], other), **EXACT)
        torch.testing.assert_close(one, unet(xs[1][:1], ts[1][:1], context[:1]), **EXACT)
    assert (cache.full_calls, cache.cached_calls) == (3, 0)


def test_cache_settings_are_checked(unet, pipe):
    with pytest.raises(CinematicError, match="cache interval must be an integer of at least 1"):
        DeepCache(interval=0)
    x, t, context = inputs(UNET_TINY, 1, 2, 8, 8)
    with pytest.raises(CinematicError, match="cache depth must be from 1 to 3"):
        with caching(unet, DeepCache(depth=4)):
            unet(x, t, context)
    with pytest.raises(CinematicError, match="cache_depth: must be an integer from 1 to 2 for this model"):
        pipe.validate(PROMPT, cache_depth=3)
    with pytest.raises(CinematicError, match="cache_interval: must be"):
        pipe.validate(PROMPT, cache_interval=0)


@pytest.mark.parametrize("low_memory", [False, True])
def test_pipeline_with_cache_runs_the_bottleneck_on_full_steps_only(pipe, low_memory):
    request = pipe.validate(PROMPT, steps=7, seed=3, cache_interval=3, **SMALL)
    with batches_of(pipe.model.unet.mid_block) as mid:
        cached = pipe.sample(request, progress=False, low_memory=low_memory)
    calls_per_step = 2 if low_memory else 1
    assert len(mid) == 3 * calls_per_step  # steps 0, 3 and 6
    plain = pipe.sample(pipe.validate(PROMPT, steps=7, seed=3, **SMALL), progress=False)
    assert cached.shape == plain.shape and torch.isfinite(cached).all()
    assert not torch.equal(cached, plain)


# --- guidance truncation -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps,stop,expected", [(50, 0.8, 40), (10, 0.7, 7), (25, 0.8, 20), (3, 0.5, 2), (9, 0, 0)])
def test_guided_steps(steps, stop, expected):
    assert guided_steps(steps, stop) == expected
    assert guided_steps(steps, 1.0) == steps


def fake_eps(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """An eps model whose output depends on x, t and the context, batch row by batch row."""
    return 0.5 * x + 1e-4 * t.view(-1, 1, 1, 1, 1) + context.mean(dim=(1, 2)).view(-1, 1, 1, 1, 1)


def test_truncation_at_one_is_plain_guidance_and_later_steps_are_conditional():
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(1, 7, 8, generator=g), torch.randn(1, 7, 8, generator=g)
    noise = torch.randn(1, 4, 2, 4, 4, generator=g)
    plain = classifier_free_guidance(fake_eps, cond, uncond, 9.0)
    full = sample("ddim", TruncatedGuidance(plain, 10), noise, 10)
    torch.testing.assert_close(full, sample("ddim", plain, noise, 10), **EXACT)

    truncated = TruncatedGuidance(plain, 2)
    x, t = torch.randn(1, 4, 2, 4, 4, generator=g), torch.tensor([500.0])
    assert torch.equal(truncated(x, t), plain(x, t)) and torch.equal(truncated(x, t), plain(x, t))
    torch.testing.assert_close(truncated(x, t), fake_eps(x, t, cond), **EXACT)  # third call: conditional only


@pytest.mark.parametrize("low_memory", [False, True])
def test_truncated_steps_call_the_unet_with_the_conditional_batch_only(pipe, low_memory):
    request = pipe.validate(PROMPT, steps=10, seed=1, guidance_stop=0.8, **SMALL)
    with batches_of(pipe.model.unet) as batches:
        truncated = pipe.sample(request, progress=False, low_memory=low_memory)
    guided = [1, 1] * 8 if low_memory else [2] * 8
    assert batches == guided + [1, 1]
    plain = pipe.sample(pipe.validate(PROMPT, steps=10, seed=1, **SMALL), progress=False)
    assert not torch.equal(truncated, plain)
    same = pipe.sample(pipe.validate(PROMPT, steps=10, seed=1, guidance_stop=1.0, **SMALL), progress=False)
    torch.testing.assert_close(same, plain, **EXACT)


def test_truncation_and_caching_together(pipe):
    # Guidance stops after step 4 of 8, a cached step (interval 3): that step runs whole with the new batch.
    request = pipe.validate(PROMPT, steps=8, seed=2, guidance_stop=0.5, cache_interval=3, **SMALL)
    with batches_of(pipe.model.unet.mid_block, frames=3) as mid:
        latents = pipe.sample(request, progress=False)
    assert mid == [2, 2, 1, 1]  # steps 0 and 3 (guided), 4 (first conditional-only step), 6
    assert torch.isfinite(latents).all()
    video = pipe(PROMPT, steps=2, seed=2, guidance_stop=0.5, cache_interval=2, progress=False, **SMALL)
    assert video.metadata["guidance_stop"] == 0.5 and video.metadata["cache_interval"] == 2
    with pytest.raises(CinematicError, match="guidance_stop: must be a number from 0 to 1"):
        pipe.validate(PROMPT, guidance_stop=1.5)


# --- precision and memory -----------------------------------------------------------------------------------------


def fp16_stored(unet: UNet3D) -> tuple[UNet3D, UNet3D]:
    """``unet``'s weights rounded to fp16: as an fp32 network, and stored in fp16 computing in fp32."""
    rounded = UNet3D(UNET_TINY).eval().requires_grad_(False)  # as loaded networks are: the same kernels' paths
    rounded.load_state_dict({k: v.half().float() for k, v in unet.state_dict().items()})
    stored = UNet3D(UNET_TINY).half().eval()
    stored.load_state_dict(rounded.state_dict())
    return rounded, compute_in(stored, torch.float32)


def test_fp16_storage_with_fp32_compute_equals_the_fp32_run_on_the_same_weights(unet):
    rounded, stored = fp16_stored(unet)
    assert storage_dtype(stored) == torch.float16
    assert all(p.dtype == torch.float16 for p in stored.parameters())
    assert stored.conv_in.weight.dtype == torch.float32  # what the layer computes with
    x, t, context = inputs(UNET_TINY, 2, 3, 10, 6)
    with torch.no_grad():
        torch.testing.assert_close(stored(x, t, context), rounded(x, t, context), **EXACT)
    with torch.inference_mode(), FlopCounterMode(display=False) as flops:  # as benchmarks/bench.py counts
        stored(x, t, context)
    assert flops.get_total_flops() > 0


def test_casts_go_to_one_arena_and_survive_the_layer_that_reads_them(unet):
    rounded, stored = fp16_stored(unet)
    arena = precision.cast_arena(stored.conv_in)
    largest = max(p.numel() for p in stored.parameters())
    assert arena.buffer.numel() == largest + (1 << 20) and arena.buffer.dtype == torch.float32
    start, end = arena.buffer.data_ptr(), arena.buffer.data_ptr() + arena.buffer.numel() * 4
    weight, bias = stored.conv_in.weight, stored.conv_in.bias  # two casts in a row, as a layer reads them
    assert start <= weight.data_ptr() < end and start <= bias.data_ptr() < end
    assert torch.equal(weight, precision.stored_parameter(stored.conv_in, "weight").float())
    # The smallest arena that holds the largest weight and a bias: the ring wraps many times in every forward.
    biggest_bias = max(p.numel() for name, p in unet.named_parameters() if name.endswith("bias"))
    arena.buffer, arena.offset = torch.empty(largest + biggest_bias + 16), 0
    x, t, context = inputs(UNET_TINY, 2, 3, 10, 6)
    with torch.no_grad():
        expected = rounded(x, t, context)
        torch.testing.assert_close(stored(x, t, context), expected, **EXACT)
        torch.testing.assert_close(stored(x, t, context), expected, **EXACT)
    original = precision.stored_parameter(stored.conv_in, "weight")
    start, end = arena.buffer.data_ptr(), arena.buffer.data_ptr() + arena.buffer.numel() * 4
    with torch.enable_grad():  # a trainable stored weight gets a differentiable cast of its own
        original.requires_grad_(True)
        assert not start <= stored.conv_in.weight.data_ptr() < end
        original.requires_grad_(False)
    assert start <= stored.conv_in.weight.data_ptr() < end


def test_pipeline_fp16_storage_equals_fp32_from_fp16_files(fp16_folder):
    fp32 = Pipeline.from_pretrained(fp16_folder, variant="fp16", dtype=torch.float32)
    lean = Pipeline.from_pretrained(fp16_folder, variant="fp16", dtype=torch.float16, compute_dtype=torch.float32)
    assert lean.dtype == torch.float32
    for network in ("unet", "text_encoder", "vae"):
        assert storage_dtype(getattr(lean.model, network)) == torch.float16
    request = fp32.validate(PROMPT, steps=4, seed=8, **SMALL)
    expected = fp32.sample(request, progress=False)
    actual = lean.sample(request, progress=False)
    torch.testing.assert_close(actual, expected, **EXACT)
    torch.testing.assert_close(lean.decode(actual)[0], fp32.decode(expected)[0], **EXACT)


def test_low_memory_frees_the_text_encoder_and_loads_it_again(folder, pipe):
    lean = Pipeline.from_pretrained(folder)
    first = lean(PROMPT, steps=3, seed=4, low_memory=True, progress=False, **SMALL)
    assert lean.model.text_encoder is None
    again = lean(PROMPT, steps=3, seed=4, low_memory=True, progress=False, **SMALL)
    assert torch.equal(first.frames, again.frames)
    reference = pipe(PROMPT, steps=3, seed=4, progress=False, **SMALL)
    assert (first.frames.int() - reference.frames.int()).abs().max() <= 1  # batched vs sequential guidance
    by_hand = Pipeline(pipe.model)  # not made by from_pretrained: it cannot reload, so it keeps the encoder
    assert by_hand.release_text_encoder() is False and pipe.model.text_encoder is not None


def test_int8_linear_layers_stay_close_to_fp32():
    # Default initialisation (the zero-initialised output layers made random), as the tiny pipeline models have:
    # with every parameter random (``randomize_``), activations grow and the error reaches 0.12.
    reference = randomize_zero_params(UNet3D(UNET_TINY)).eval()
    quantized = UNet3D(UNET_TINY).eval()
    quantized.load_state_dict(reference.state_dict())
    quantize_int8(quantized)
    linears = sum(type(m) is torch.nn.Linear for m in reference.modules())
    assert not any(type(m) is torch.nn.Linear for m in quantized.modules())
    assert sum(type(m).__module__.startswith("torch.ao.nn.quantized.dynamic") for m in quantized.modules()) == linears
    x, t, context = inputs(UNET_TINY, 2, 3, 10, 6)
    with torch.no_grad():
        expected, actual = reference(x, t, context), quantized(x, t, context)
    relative = (actual - expected).norm() / expected.norm()
    assert 0 < relative < 0.06, relative  # 0.042 measured


def test_int8_pipeline_and_its_limits(folder):
    int8 = Pipeline.from_pretrained(folder, int8=True)
    latents = int8.sample(int8.validate(PROMPT, steps=2, seed=0, **SMALL), progress=False)
    assert torch.isfinite(latents).all()
    with pytest.raises(CinematicError, match="int8 runs on the CPU with float32 compute only"):
        Pipeline.from_pretrained(folder, dtype=torch.float16, int8=True)


# --- CPU step levers ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 16, 5, 6, 4), (1, 8, 1, 3, 3), (3, 8, 2, 1, 7)])
def test_frame_conv_equals_the_conv3d_it_replaces(shape):
    conv = FrameConv(shape[1], shape[1])
    reference = torch.nn.Conv3d(shape[1], shape[1], (3, 1, 1), padding=(1, 0, 0))
    reference.load_state_dict(conv.state_dict())
    assert conv.weight.shape == (shape[1], shape[1], 3, 1, 1)
    x = torch.randn(shape)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), reference(x), rtol=1e-5, atol=1e-5)
    conv(x).square().sum().backward()
    reference(x).square().sum().backward()
    torch.testing.assert_close(conv.weight.grad, reference.weight.grad, rtol=1e-4, atol=1e-4)


# --- the command line -----------------------------------------------------------------------------------------------


def test_generate_with_every_fast_and_lean_switch(folder, tmp_path, capsys):
    from cinematic import video

    out = tmp_path / "clip.mp4"
    args = [
        "generate",
        "a red cat",
        "-o",
        str(out),
        "--model",
        str(folder),
        "--seed",
        "3",
        "--num-inference-steps",
        "3",
    ]
    args += ["--num-frames", "2", "--height", "32", "--width", "32", "--dtype", "fp16", "--compute", "fp32"]
    args += ["--low-memory", "--cache-interval", "2", "--cache-depth", "2", "--guidance-stop", "0.6"]
    assert main(args) == 0, capsys.readouterr().err
    metadata = video.read(out).metadata
    assert metadata["cache_interval"] == 2 and metadata["cache_depth"] == 2 and metadata["guidance_stop"] == 0.6
    assert (
        main(
            [
                "generate",
                "a cat",
                "-o",
                str(tmp_path / "q.mp4"),
                "--model",
                str(folder),
                "--int8",
                "--num-inference-steps",
                "1",
                "--num-frames",
                "2",
                "--height",
                "32",
                "--width",
                "32",
            ]
        )
        == 0
    )  # noqa: E501


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--guidance-stop", "1.5"], "guidance_stop: must be a number from 0 to 1"),
        (["--cache-interval", "0"], "cache_interval: must be an integer from 1 to 1000"),
        (["--cache-depth", "5"], "cache_depth: must be an integer from 1 to 2 for this model"),
        (["--int8", "--dtype", "bf16"], "int8 runs on the CPU with float32 compute only"),
    ],
)
def test_generate_rejects_bad_fast_mode_settings(folder, tmp_path, capsys, extra, message):
    args = [
        "generate",
        "a cat",
        "-o",
        str(tmp_path / "c.mp4"),
        "--model",
        str(folder),
        "--num-inference-steps",
        "1",
        "--seed",
        "1",
    ]
    assert main([*args, "--num-frames", "2", "--height", "32", "--width", "32", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert list(tmp_path.iterdir()) == []


# --- low-memory feed-forward ----------------------------------------------------------------------------------------


def test_chunked_feed_forward_equals_the_whole_one():
    from cinematic.models.layers import FeedForward, chunked_feed_forward

    ff = FeedForward(16).eval()
    x = torch.randn(2, 37, 16)  # 74 rows: pieces of 8 rows and a last one of 2
    with torch.inference_mode():
        whole = ff(x)
        with chunked_feed_forward(ff, 8):
            assert ff.rows == 8
            chunked = ff(x)
    assert ff.rows is None
    assert chunked.shape == whole.shape
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)


def test_low_memory_sampling_runs_the_feed_forwards_in_pieces(pipe):
    from cinematic.models.layers import FeedForward
    from cinematic.pipeline import Memory

    pieces = Memory(batched_guidance=False, feed_forward_rows=16)  # the tiny model's calls have 32+ rows
    assert Memory.low().feed_forward_rows == 4096 and not Memory.low().batched_guidance
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, a: seen.append(m.rows)) for m in pipe.model.unet.modules()
             if isinstance(m, FeedForward)]  # fmt: skip
    try:
        plain = pipe.sample(pipe.validate(PROMPT, steps=2, seed=0, **SMALL), progress=False)
        assert set(seen) == {None}
        seen.clear()
        low = pipe.sample(pipe.validate(PROMPT, steps=2, seed=0, **SMALL), progress=False, memory=pieces)
        assert set(seen) == {16}
    finally:
        for h in hooks:
            h.remove()
    torch.testing.assert_close(low, plain, rtol=1e-3, atol=1e-4)  # batch 1 vs 2 and the pieces: fp32 rounding
