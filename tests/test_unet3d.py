"""UNet3D: parity with diffusers' UNet3DConditionModel (diffusers==0.42.1) and ModelScope's UNetSD
(modelscope==1.40.2) on tiny random configs, full-size key sets on the meta device, and invariances."""

from __future__ import annotations

import dataclasses

import pytest
import safetensors.torch
import torch
from diffusers import UNet3DConditionModel
from modelscope.models.multi_modal.video_synthesis.unet_sd import UNetSD

from cinematic.errors import CinematicError
from cinematic.models import modifications
from cinematic.models.layers import checkpoint_gradients
from cinematic.models.unet3d import UNET_FULL, UNET_TINY, UNet3D, UNet3DConfig, UNetLevel
from cinematic.models.unet3d_config import ShapesOptions
from cinematic.weights.modelscope_unet import convert_modelscope_unet

TOL = {"rtol": 1e-5, "atol": 1e-5}

# ModelScope hard-codes GroupNorm(32) everywhere and a 1024-wide context in the decoder's cross-attention,
# so its tiny config keeps those two; transformer_in_heads != 8 checks that its head count is configurable.
MS_TINY = UNet3DConfig(
    levels=(UNetLevel(32, True), UNetLevel(32, False), UNetLevel(64, True)),
    layers_per_block=1,
    head_dim=16,
    cross_attention_dim=1024,
    norm_groups=32,
    transformer_in_heads=4,
)


def randomize_(module: torch.nn.Module) -> torch.nn.Module:
    """Every parameter random, including the zero-initialised ones (temporal conv4, ModelScope's proj_out and
    out conv): otherwise whole branches are identities and a wrong wiring there would go unnoticed."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim > 1:
                p.copy_(torch.randn_like(p) / p[0].numel() ** 0.5)
            else:  # biases near 0, norm scales near 1
                p.copy_(0.1 * torch.randn_like(p) + (1.0 if name.endswith("weight") else 0.0))
    return module.eval()


def diffusers_unet(config: UNet3DConfig) -> UNet3DConditionModel:
    assert config.transformer_in_heads == 8, "diffusers hard-codes 8 heads in transformer_in"
    down = ["CrossAttnDownBlock3D" if lvl.attention else "DownBlock3D" for lvl in config.levels]
    up = ["CrossAttnUpBlock3D" if lvl.attention else "UpBlock3D" for lvl in reversed(config.levels)]
    return UNet3DConditionModel(
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        block_out_channels=tuple(lvl.channels for lvl in config.levels),
        layers_per_block=config.layers_per_block,
        norm_num_groups=config.norm_groups,
        norm_eps=config.norm_eps,
        cross_attention_dim=config.cross_attention_dim,
        attention_head_dim=config.head_dim,  # diffusers' name for it; see reference-model.md §3.1
        time_cond_proj_dim=config.time_cond_proj_dim,
    )


def modelscope_unet(config: UNet3DConfig) -> UNetSD:
    dim = config.levels[0].channels
    return UNetSD(
        in_dim=config.in_channels,
        dim=dim,
        y_dim=768,  # stored but unused
        context_dim=config.cross_attention_dim,
        out_dim=config.out_channels,
        dim_mult=[lvl.channels // dim for lvl in config.levels],
        num_heads=config.transformer_in_heads,
        head_dim=config.head_dim,
        num_res_blocks=config.layers_per_block,
        attn_scales=[1 / 2**i for i, lvl in enumerate(config.levels) if lvl.attention],
        dropout=0.1,
        temporal_attention=True,
    )


def inputs(config: UNet3DConfig, batch: int, frames: int, h: int, w: int) -> tuple[torch.Tensor, ...]:
    x = torch.randn(batch, config.in_channels, frames, h, w)
    t = torch.tensor([981, 17, 500][:batch])
    context = torch.randn(batch, 7, config.cross_attention_dim)
    return x, t, context


def ours_from(state_dict: dict[str, torch.Tensor], config: UNet3DConfig) -> UNet3D:
    model = UNet3D(config)
    model.load_state_dict(state_dict, strict=True)
    return model.float().eval()


@pytest.mark.parametrize("fmt", ["safetensors", "bin", "fp16"])
def test_matches_diffusers(tmp_path, fmt):
    ref = randomize_(diffusers_unet(UNET_TINY))
    if fmt == "fp16":
        ref.half().save_pretrained(tmp_path, variant="fp16")
        state = safetensors.torch.load_file(tmp_path / "diffusion_pytorch_model.fp16.safetensors")
        assert all(v.dtype == torch.float16 for v in state.values())
        ref.float()  # the reference runs in fp32 with the same fp16-rounded weights
    elif fmt == "bin":
        ref.save_pretrained(tmp_path, safe_serialization=False)
        state = torch.load(tmp_path / "diffusion_pytorch_model.bin", weights_only=True)
    else:
        ref.save_pretrained(tmp_path)
        state = safetensors.torch.load_file(tmp_path / "diffusion_pytorch_model.safetensors")
    ours = ours_from(state, UNET_TINY)
    # 10x6 latents become 5x3 then 3x2: the upsamplers must return to the skips' sizes (diffusers' upsample_size).
    cases = [(1, 40, 24), (3, 10, 6), (8, 6, 10)] if fmt == "safetensors" else [(3, 10, 6)]
    for frames, h, w in cases:
        x, t, context = inputs(UNET_TINY, 2, frames, h, w)
        with torch.no_grad():
            expected = ref(x, t, context).sample
            actual = ours(x, t, context)
        assert actual.shape == (2, UNET_TINY.out_channels, frames, h, w)
        torch.testing.assert_close(actual, expected, **TOL)


def test_matches_modelscope(tmp_path):
    ref = randomize_(modelscope_unet(MS_TINY))
    torch.save(ref.state_dict(), tmp_path / "text2video_pytorch_model.pth")
    state = torch.load(tmp_path / "text2video_pytorch_model.pth", weights_only=True)
    ours = ours_from(convert_modelscope_unet(state, MS_TINY), MS_TINY)
    # UNetSD always doubles when upsampling: H and W must be multiples of 2**(levels-1).
    for frames, h, w in [(1, 8, 12), (4, 12, 8)]:
        x, t, context = inputs(MS_TINY, 2, frames, h, w)
        with torch.no_grad():
            expected = ref(x, t, y=context)
            actual = ours(x, t, context)
        torch.testing.assert_close(actual, expected, **TOL)


def test_full_size_on_meta():
    with torch.device("meta"):
        ours = UNet3D(UNET_FULL).state_dict()
        diffusers = UNet3DConditionModel(
            block_out_channels=(320, 640, 1280, 1280),
            attention_head_dim=64,
            cross_attention_dim=1024,
            layers_per_block=2,
        ).state_dict()
        modelscope = modelscope_unet(UNET_FULL).state_dict()
    assert len(ours) == 1480
    assert sum(v.numel() for v in ours.values()) == 1_411_233_860
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in diffusers.items()}
    converted = convert_modelscope_unet(modelscope, UNET_FULL)
    assert len(modelscope) == 1480
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in ours.items()}


def test_converter_names_unknown_and_missing_keys():
    with torch.device("meta"):
        state = modelscope_unet(MS_TINY).state_dict()
    bogus = {**state, "input_blocks.1.0.in_layers.9.weight": state["input_blocks.1.0.in_layers.0.weight"]}
    with pytest.raises(CinematicError, match=r"input_blocks\.1\.0\.in_layers\.9\.weight"):
        convert_modelscope_unet(bogus, MS_TINY)
    with pytest.raises(CinematicError, match="fps_embedding.0.weight"):
        convert_modelscope_unet({**state, "fps_embedding.0.weight": state["time_embed.0.weight"]}, MS_TINY)
    partial = {k: v for k, v in state.items() if k != "output_blocks.0.0.temopral_conv.conv4.3.bias"}
    with pytest.raises(CinematicError, match=r"up_blocks\.0\.temp_convs\.0\.conv4\.3\.bias"):
        convert_modelscope_unet(partial, MS_TINY)
    wider = dataclasses.replace(MS_TINY, cross_attention_dim=768)
    with pytest.raises(CinematicError, match="shape"):
        convert_modelscope_unet(state, wider)


def test_config_validation():
    with pytest.raises(CinematicError, match="norm_groups"):
        UNet3DConfig(levels=(UNetLevel(48, True),), norm_groups=32)
    with pytest.raises(CinematicError, match="head_dim"):
        UNet3DConfig(levels=(UNetLevel(96, True),), head_dim=64)


def test_batch_of_two_equals_two_batches_of_one():
    model = randomize_(UNet3D(UNET_TINY))
    x, t, context = inputs(UNET_TINY, 2, 3, 10, 6)
    with torch.no_grad():
        both = model(x, t, context)
        one_by_one = torch.cat([model(x[i : i + 1], t[i], context[i : i + 1]) for i in range(2)])
    torch.testing.assert_close(both, one_by_one, **TOL)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = randomize_(UNet3D(UNET_TINY))
    x, t, context = inputs(UNET_TINY, 1, 2, 8, 8)
    grads = []
    for enabled in (False, True):
        model.zero_grad()
        if enabled:
            checkpoint_gradients(model)
        model(x, t, context).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert [m.kind for m in modifications.active(model)] == ["gradient_checkpointing"]
    modifications.undo_all(model)
    assert not model.gradient_checkpointing and not modifications.active(model)
    torch.testing.assert_close(grads[1], grads[0], **TOL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_runs_in_half_precision(dtype):
    model = randomize_(UNet3D(UNET_TINY))
    x, _, context = inputs(UNET_TINY, 1, 2, 10, 6)
    with torch.no_grad():
        expected = model(x, 981, context)  # a plain int timestep works too
        actual = model.to(dtype)(x.to(dtype), 981, context.to(dtype))
    assert actual.dtype == dtype
    torch.testing.assert_close(actual.float(), expected, rtol=0.1, atol=0.1)


def shapes_tiny(**options: object) -> UNet3DConfig:
    """The tiny UNet with some of the shapes model's research options on."""
    return dataclasses.replace(UNET_TINY, shapes=ShapesOptions(**options))


def test_frame_positions_give_temporal_attention_the_frame_order():
    from cinematic.models.unet3d_blocks import TemporalTransformer, frame_embedding

    torch.manual_seed(0)
    plain, placed = TemporalTransformer(16, 2, 8, 4), TemporalTransformer(16, 2, 8, 4, positions=True)
    placed.load_state_dict(plain.state_dict())  # no weights of their own: the same keys and tensors
    x = torch.randn(2 * 6, 16, 3, 3)  # [(B F), C, H, W], 6 frames
    order = torch.tensor([5, 2, 0, 4, 1, 3])
    permute = lambda t: t.view(2, 6, 16, 3, 3)[:, order].reshape(12, 16, 3, 3)  # noqa: E731
    with torch.no_grad():
        # Without positions, attention over frames cannot tell their order: permuting the input permutes the output.
        torch.testing.assert_close(plain(permute(x), 6), permute(plain(x, 6)), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(placed(permute(x), 6), permute(placed(x, 6)), rtol=1e-3, atol=1e-3)
    table = frame_embedding(6, 9, torch.device("cpu"), torch.float32)
    assert (
        table.shape == (6, 9) and torch.equal(table[0, :4], torch.zeros(4)) and torch.equal(table[:, 8], torch.zeros(6))
    )
    full = UNet3D(shapes_tiny(frame_positions=True))
    assert full.state_dict().keys() == UNet3D(UNET_TINY).state_dict().keys()
    assert all(t.positions for t in full.modules() if isinstance(t, TemporalTransformer))


def test_coordinate_planes_tell_the_unet_where_each_pixel_is():
    from cinematic.models.components import ModelConfig
    from cinematic.models.unet3d import coordinate_planes

    x = torch.randn(2, 4, 3, 5, 4)
    planes = coordinate_planes(x)
    assert planes.shape == (2, 3, 3, 5, 4)
    torch.testing.assert_close(planes[1, 0, 2, 4], torch.linspace(-1, 1, 4))  # x along a row
    torch.testing.assert_close(planes[0, 1, 1, :, 3], torch.linspace(-1, 1, 5))  # y down a column
    torch.testing.assert_close(planes[0, 2, :, 2, 2], torch.linspace(-1, 1, 3))  # frame position
    assert torch.equal(coordinate_planes(torch.randn(1, 4, 1, 1, 1)), torch.zeros(1, 3, 1, 1, 1))

    config = shapes_tiny(coordinates=True)
    stored = ModelConfig().to_dict()
    stored["unet"] = {**stored["unet"], "coordinates": True}  # flat, as the bundled model.json holds it
    assert ModelConfig.from_dict(stored).unet.options.coordinates
    torch.manual_seed(0)
    plain, placed = randomize_(UNet3D(UNET_TINY)).eval(), UNet3D(config).eval()
    state = plain.state_dict()
    # The planes are three more input channels of conv_in and nothing else: with their weights at 0 the UNet is the
    # plain one, with any other weights its output moves.
    first = state["conv_in.weight"]
    widened = torch.cat([first, first.new_zeros(first.shape[0], 3, 3, 3)], dim=1)
    placed.load_state_dict({**state, "conv_in.weight": widened})
    x, t, context = inputs(UNET_TINY, 2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(placed(x, t, context), plain(x, t, context), rtol=0, atol=0)
        placed.conv_in.weight[:, 4:] = 0.1
        assert not torch.allclose(placed(x, t, context), plain(x, t, context), atol=1e-3)


def test_temporal_context_lets_a_word_act_differently_on_each_frame():
    from cinematic.models.components import ModelConfig
    from cinematic.models.unet3d_blocks import TemporalTransformer

    torch.manual_seed(0)
    # Every frame alike: per-frame spatial cross-attention must respond alike on all of them; a temporal transformer
    # that reads the text (with frame positions) responds to a change of caption differently per frame.
    frame = torch.randn(1, 16, 3, 3)
    x = frame.repeat(2 * 6, 1, 1, 1)  # [(B F), C, H, W], 2 videos of 6 identical frames
    text_a, text_b = torch.randn(2, 5, 24), torch.randn(2, 5, 24)
    per_frame = lambda c: c.repeat_interleave(6, dim=0)  # noqa: E731  [B,L,D] -> [(B F),L,D]
    reads = randomize_(TemporalTransformer(16, 2, 8, 4, positions=True, context_dim=24)).eval()
    with torch.no_grad():
        delta = (reads(x, 6, per_frame(text_a)) - reads(x, 6, per_frame(text_b))).view(2, 6, 16, 3, 3)
        assert delta.abs().amax() > 1e-2
        assert not torch.allclose(delta[:, 0], delta[:, 5], atol=1e-3)  # first and last frame react differently
        # Each video reads its own caption: video 0's output does not move when only video 1's caption changes.
        mixed = torch.stack([text_a[0], text_b[1]])
        torch.testing.assert_close(reads(x, 6, per_frame(mixed))[:6], reads(x, 6, per_frame(text_a))[:6])
    with pytest.raises(ValueError, match="pass the context"):
        reads(x, 6)

    # Off by default (the published layout); on, only the temporal attn2 key/value projections change shape.
    config = shapes_tiny(temporal_context=True)
    plain, crossed = UNet3D(UNET_TINY).state_dict(), UNet3D(config).state_dict()
    assert plain.keys() == crossed.keys()
    changed = {k for k in plain if plain[k].shape != crossed[k].shape}
    assert changed and all(("temp_attentions" in k or "transformer_in" in k) and "attn2.to_" in k for k in changed)
    assert all(crossed[k].shape[1] == UNET_TINY.cross_attention_dim for k in changed)
    stored = ModelConfig().to_dict()
    stored["unet"] = {**stored["unet"], "temporal_context": True}
    assert ModelConfig.from_dict(stored).unet.options.temporal_context and UNET_FULL.shapes is None
    x, t, context = inputs(UNET_TINY, 2, 3, 8, 8)
    with torch.no_grad():
        assert UNet3D(config).eval()(x, t, context).shape == x.shape


def test_pooled_text_reaches_every_resnet_through_the_time_embedding():
    from cinematic.models.components import ModelConfig

    config = shapes_tiny(pooled_text=True)
    plain, pooled = UNet3D(UNET_TINY).state_dict(), UNet3D(config).state_dict()
    assert set(pooled) - set(plain) == {f"text_embedding.linear_{i}.{p}" for i in (1, 2) for p in ("weight", "bias")}
    assert pooled["text_embedding.linear_1.weight"].shape == (UNET_TINY.time_embed_dim, UNET_TINY.cross_attention_dim)
    stored = ModelConfig().to_dict()
    stored["unet"] = {**stored["unet"], "pooled_text": True}
    assert ModelConfig.from_dict(stored).unet.options.pooled_text and not UNET_FULL.options.pooled_text

    torch.manual_seed(0)
    x, t, context = inputs(UNET_TINY, 2, 3, 8, 8)
    other = context.clone()
    other[:, 2] += 1.0  # one token changed
    for cfg, moves in ((UNET_TINY, False), (config, True)):
        model = randomize_(UNet3D(cfg)).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():  # cut every cross-attention: text can only come in pooled
                if "attn2.to_v" in name:
                    p.zero_()
            changed = (model(x, t, context) - model(x, t, other)).abs().amax()
        assert (changed > 1e-3) == moves, (cfg.options.pooled_text, changed)


def test_text_planes_draw_a_caption_dependent_layout_into_conv_in():
    from cinematic.models.components import ModelConfig
    from cinematic.models.unet3d import LAYOUT_BASIS, layout_basis

    x = torch.randn(1, 4, 5, 3, 4)
    basis = layout_basis(x)
    assert basis.shape == (LAYOUT_BASIS, 5, 3, 4)
    c, r, f = torch.linspace(-1, 1, 4), torch.linspace(-1, 1, 3), torch.linspace(-1, 1, 5)
    torch.testing.assert_close(basis[3, :, 1, :], f[:, None] * c[None, :])  # x * frame: the sign flips over the clip
    torch.testing.assert_close(basis[4, :, :, 0], f[:, None] * r[None, :])  # y * frame
    torch.testing.assert_close(basis[8, :, 0, 0], f * f)

    config = shapes_tiny(text_planes=2)
    stored = ModelConfig().to_dict()
    stored["unet"] = {**stored["unet"], "text_planes": 2}
    assert ModelConfig.from_dict(stored).unet.options.text_planes == 2 and UNET_FULL.options.text_planes == 0
    plain, planed = UNet3D(UNET_TINY).state_dict(), UNet3D(config).state_dict()
    assert set(planed) - set(plain) == {"text_layout.weight", "text_layout.bias"}
    assert planed["conv_in.weight"].shape[1] == plain["conv_in.weight"].shape[1] + 2

    torch.manual_seed(0)
    model = randomize_(UNet3D(config)).eval()
    x, t, context = inputs(UNET_TINY, 2, 3, 8, 8)
    other = context.clone()
    other[1, 3] += 1.0  # one token of the second video's caption
    with torch.no_grad():
        for name, p in model.named_parameters():  # cut every cross-attention: text comes in through the planes only
            if "attn2.to_v" in name:
                p.zero_()
        a, b = model(x, t, context), model(x, t, other)
        assert torch.equal(a[0], b[0]) and (a[1] - b[1]).abs().amax() > 1e-3
        model.conv_in.weight[:, -2:] = 0  # the planes' only way in is conv_in
        torch.testing.assert_close(model(x, t, context), model(x, t, other), rtol=0, atol=0)


def test_shapes_options_load_from_the_old_flat_keys_and_are_stored_apart():
    from cinematic.models.components import ModelConfig
    from cinematic.weights import load

    bundled = load("shapes").config.unet  # its model.json still holds the options flat among the unet's fields
    assert bundled.shapes == ShapesOptions(frame_positions=True, coordinates=True, pooled_text=True, text_planes=4)
    stored = ModelConfig(unet=bundled, text_encoder=dataclasses.replace(ModelConfig().text_encoder, width=64))
    data = stored.to_dict()
    assert data["unet"]["shapes"] == dataclasses.asdict(bundled.shapes)
    assert not set(data["unet"]) & {"frame_positions", "coordinates", "temporal_context", "pooled_text", "text_planes"}
    assert ModelConfig.from_dict(data) == stored  # the new form round-trips
    published = ModelConfig().to_dict()
    assert "shapes" not in published["unet"]  # the published config is only what the published model has
    flat_off = {**published["unet"], "frame_positions": False, "text_planes": 0}  # an old published checkpoint
    assert ModelConfig.from_dict({**published, "unet": flat_off}).unet == UNET_FULL
    both = {**published["unet"], "coordinates": True, "shapes": {"coordinates": True}}
    with pytest.raises(CinematicError, match="both flat and under 'shapes'"):
        ModelConfig.from_dict({**published, "unet": both})
