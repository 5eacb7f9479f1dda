"""LoRA: adapters save and reload bitwise, merged equals unmerged, unmerging restores the weights, training trains
the adapters alone (and resumes exactly), diffusers' adapter layouts load and match a diffusers UNet with the update
folded in, and bad adapters are one clear error.

Everything runs tiny preset models on the CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cinematic.data.shapes import ShapesDataset
from cinematic.errors import CinematicError
from cinematic.models import lora_adapters as lora_modules
from cinematic.models.lora_adapters import LoRAConfig
from cinematic.pipeline import Pipeline
from cinematic.weights.lora_formats import FILE_NAME, INFO_NAME, read_adapter, write_adapter
from tests.factories import write_tiny_model

CLIP = {"frames": 4, "height": 32, "width": 32}
PROMPT = "a red circle moving left"
GENERATE = {"num_frames": 2, "height": 32, "width": 32, "steps": 3, "seed": 1, "progress": False}


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A fresh tiny model (random weights) written in cinematic's format, trained size 4 x 32 x 32."""
    torch.set_num_threads(1)
    return write_tiny_model(tmp_path_factory.mktemp("base"))


def random_adapter(unet: torch.nn.Module, rank: int = 2, alpha: float = 3.0, targets: str = "both", seed: int = 0):
    """Attach an adapter whose up matrices are random too (a fresh one is a no-op), and return its state."""
    generator = torch.Generator().manual_seed(seed)
    adapters = lora_modules.add_lora(unet, LoRAConfig(rank, alpha, targets), "test")
    with torch.no_grad():
        for a in adapters.values():
            a.down.weight.copy_(torch.randn(a.down.weight.shape, generator=generator) * 0.3)
            a.up.weight.copy_(torch.randn(a.up.weight.shape, generator=generator) * 0.3)
    state = {k: (d.clone(), u.clone(), al) for k, (d, u, al) in lora_modules.adapter_state(unet, "test").items()}
    lora_modules.remove(unet, "test")
    return state


@pytest.fixture(scope="module")
def adapter_dir(base: Path, tmp_path_factory) -> Path:
    pipe = Pipeline.from_pretrained(base)
    state = random_adapter(pipe.model.unet)
    return write_adapter(tmp_path_factory.mktemp("adapter"), state, 2, 3.0, "both", torch.float32).parent


def write_foreign(path: Path) -> None:
    """A well-formed adapter for a layer that no UNet has."""
    save_file(
        {"unet.nowhere.to_q.lora_A.weight": torch.zeros(2, 8), "unet.nowhere.to_q.lora_B.weight": torch.zeros(8, 2)},
        str(path),
    )


def frames(video) -> torch.Tensor:
    return video.frames.float()


def test_targets_pick_the_attention_projections(base: Path):
    unet = Pipeline.from_pretrained(base).model.unet
    spatial = lora_modules.target_layers(unet, "spatial")
    temporal = lora_modules.target_layers(unet, "temporal")
    both = lora_modules.target_layers(unet, "both")
    assert set(both) == set(spatial) | set(temporal) and not set(spatial) & set(temporal)
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q" in spatial
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0" in spatial
    assert "transformer_in.transformer_blocks.0.attn1.to_k" in temporal
    assert "mid_block.temp_attentions.0.transformer_blocks.0.attn2.to_v" in temporal
    assert all(name.rsplit(".", 2)[-2:] != ["ff", "net"] for name in both)
    assert len(spatial) % 8 == 0 and len(temporal) % 8 == 0  # 4 projections x 2 attentions per transformer block


def test_saved_adapter_reloads_bitwise(base: Path, adapter_dir: Path):
    keys = load_file(adapter_dir / FILE_NAME)
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in keys
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.lora_B.weight" in keys
    assert json.loads((adapter_dir / INFO_NAME).read_text())["rank"] == 2
    state, info = read_adapter(adapter_dir)
    assert info["alpha"] == 3.0
    pipe = Pipeline.from_pretrained(base)
    name = pipe.load_lora(adapter_dir)
    loaded = lora_modules.adapter_state(pipe.model.unet, name)
    assert set(loaded) == set(state)
    for layer, (down, up, alpha) in state.items():
        assert torch.equal(loaded[layer][0], down) and torch.equal(loaded[layer][1], up) and loaded[layer][2] == alpha
    again = write_adapter(adapter_dir.parent / "again", loaded, 2, 3.0, "both", torch.float32)
    first, second = load_file(adapter_dir / FILE_NAME), load_file(again)
    assert set(first) == set(second) and all(torch.equal(first[k], second[k]) for k in first)


def test_merged_equals_unmerged_and_unloading_restores_the_weights(base: Path, adapter_dir: Path):
    pipe = Pipeline.from_pretrained(base)
    before = {k: v.clone() for k, v in pipe.model.unet.state_dict().items()}
    plain = frames(pipe(PROMPT, **GENERATE))
    pipe.load_lora(adapter_dir, scale=0.8)
    unmerged = frames(pipe(PROMPT, **GENERATE))
    assert (unmerged - plain).abs().max() > 2  # the adapter changes the video
    pipe.unload_lora()
    pipe.load_lora(adapter_dir, scale=0.8, merge=True)
    merged = frames(pipe(PROMPT, **GENERATE))
    assert (merged - unmerged).abs().max() <= 1  # float32 rounding of W + dW, at most one uint8 level
    name = lora_modules.adapter_names(pipe.model.unet)[0]
    latents = {}
    for merge in (True, False):
        if not merge:
            lora_modules.unmerge(pipe.model.unet, name)
        latents[merge] = pipe.sample(pipe.validate(PROMPT, **{k: v for k, v in GENERATE.items() if k != "progress"}),
                                     progress=False)  # fmt: skip
    torch.testing.assert_close(latents[True], latents[False], rtol=1e-4, atol=1e-4)
    pipe.unload_lora()
    after = pipe.model.unet.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert torch.equal(frames(pipe(PROMPT, **GENERATE)), plain)


def test_from_pretrained_takes_loras_and_scale_zero_is_the_base(base: Path, adapter_dir: Path):
    plain = frames(Pipeline.from_pretrained(base)(PROMPT, **GENERATE))
    off = Pipeline.from_pretrained(base, loras=[(adapter_dir, 0.0)])
    assert torch.equal(frames(off(PROMPT, **GENERATE)), plain)
    twice = Pipeline.from_pretrained(base, loras=[(adapter_dir, 0.5), (adapter_dir, 0.5)], merge_loras=True)
    once = Pipeline.from_pretrained(base, loras=[(adapter_dir, 1.0)])
    assert (frames(twice(PROMPT, **GENERATE)) - frames(once(PROMPT, **GENERATE))).abs().max() <= 1


def test_a_calls_loras_apply_to_that_call_only(base: Path, adapter_dir: Path):
    pipe = Pipeline.from_pretrained(base)
    plain = frames(pipe(PROMPT, **GENERATE))
    with_lora = frames(pipe(PROMPT, loras=[(adapter_dir, 0.8)], **GENERATE))
    assert torch.equal(
        with_lora, frames(Pipeline.from_pretrained(base, loras=[(adapter_dir, 0.8)])(PROMPT, **GENERATE))
    )
    assert lora_modules.adapter_names(pipe.model.unet) == []
    assert torch.equal(frames(pipe(PROMPT, **GENERATE)), plain)


def test_bad_adapters_are_one_clear_error(base: Path, adapter_dir: Path, tmp_path: Path):
    pipe = Pipeline.from_pretrained(base)
    foreign = tmp_path / "foreign.safetensors"
    write_foreign(foreign)
    with pytest.raises(CinematicError, match="matches no layer"):
        pipe.load_lora(foreign)
    with pytest.raises(CinematicError, match="missing LoRA file"):
        pipe.load_lora(tmp_path / "absent.safetensors")
    for scale in (float("nan"), "strong", True):
        with pytest.raises(CinematicError, match="lora scale"):
            pipe.load_lora(adapter_dir, scale=scale)
    assert lora_modules.adapter_names(pipe.model.unet) == []  # nothing half-loaded


def test_cli_bad_lora_writes_nothing(base: Path, tmp_path: Path, capsys):
    from cinematic.cli import main

    foreign = tmp_path / "foreign.safetensors"
    write_foreign(foreign)
    out = tmp_path / "clip.mp4"
    common = [
        "generate",
        PROMPT,
        "--model",
        str(base),
        "--num-inference-steps",
        "2",
        "--num-frames",
        "2",
        "--seed",
        "1",
        "-o",
        str(out),
    ]
    assert main([*common, "--lora", str(foreign)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "matches no layer" in err[0]
    assert main([*common, "--lora", f"{foreign}:strong"]) == 2
    assert "scale" in capsys.readouterr().err
    assert main([*common, "--lora", str(tmp_path / "absent.safetensors")]) == 2
    assert "missing LoRA file" in capsys.readouterr().err
    assert not out.exists()


FAST = {"batch_size": 2, "lr": 4e-3, "warmup_steps": 2, "ema_decay": 0.9, "progress": False, **CLIP}


def test_training_trains_the_adapter_alone_and_resumes_exactly(base: Path, tmp_path: Path):
    from cinematic.train import TrainConfig, train
    from cinematic.train.distributed import World
    from cinematic.train.loop import Trainer, _open_run
    from cinematic.train.state import prepare_out

    clips = ShapesDataset(size=32, frames=4, length=2)
    common = {"init": str(base), "lora": 2, "lora_alpha": 4.0, "lora_targets": "spatial", "steps": 4, **FAST}
    config = TrainConfig(tmp_path / "straight", save_every=4, **common)
    prepare_out(config.out, False)
    trainer = Trainer(_open_run(config, clips, None, World()), None)  # one process, on the CPU
    trained = {name for name, _ in trainer.trainable["unet"]}
    assert trained and all(".lora_adapters.default." in name for name in trained)
    reference = Pipeline.from_pretrained(base).model
    final = trainer.fit()
    assert final == config.out / "model" and (final / FILE_NAME).is_file()
    for network in ("unet", "text_encoder", "vae"):
        after = getattr(trainer.model, network).state_dict()
        for key, value in getattr(reference, network).state_dict().items():
            assert torch.equal(after[key], value), f"{network}.{key} changed"
    state, info = read_adapter(final)
    assert info["rank"] == 2 and info["alpha"] == 4.0 and info["targets"] == "spatial"
    assert set(state) == set(lora_modules.target_layers(reference.unet, "spatial"))
    assert any(up.abs().max() > 0 for _, up, _ in state.values())  # the zero-initialised up matrices learned
    assert not any(name.endswith(".safetensors") and name != FILE_NAME for name in (p.name for p in final.iterdir()))

    sliced = tmp_path / "sliced"
    assert train(TrainConfig(sliced, save_every=4, stop_at=2, **common), dataset=clips).name == "checkpoint-000002"
    assert train(TrainConfig(sliced, save_every=4, resume=True, **common), dataset=clips) == sliced / "model"
    first, second = load_file(final / FILE_NAME), load_file(sliced / "model" / FILE_NAME)
    assert set(first) == set(second) and all(torch.equal(first[k], second[k]) for k in first)

    pipe = Pipeline.from_pretrained(base, loras=[(final, 1.0)])
    assert lora_modules.adapter_names(pipe.model.unet) == ["lora0"]


def test_train_config_checks_the_lora_settings(base: Path, tmp_path: Path):
    from cinematic.train import TrainConfig

    with pytest.raises(CinematicError, match="lora rank"):
        TrainConfig(tmp_path, init=str(base), lora=0)
    with pytest.raises(CinematicError, match="lora targets"):
        TrainConfig(tmp_path, init=str(base), lora=4, lora_targets="everything")
    with pytest.raises(CinematicError, match="lora alpha"):
        TrainConfig(tmp_path, init=str(base), lora=4, lora_alpha=-1.0)
    with pytest.raises(CinematicError, match="--init"):
        TrainConfig(tmp_path, preset="tiny", lora=4)
    with pytest.raises(CinematicError, match="need --lora"):
        TrainConfig(tmp_path, init=str(base), lora_alpha=2.0)


def diffusers_reference(state: dict, scale: float = 1.0):
    """diffusers' UNet3DConditionModel (diffusers==0.42.1) with each adapter's update folded into its weights by
    hand: ``W + scale * alpha / rank * up @ down``; and our UNet with the same base weights."""
    from cinematic.models.unet3d import UNET_TINY
    from tests.test_unet3d import diffusers_unet, ours_from, randomize_

    torch.manual_seed(0)
    ref = randomize_(diffusers_unet(UNET_TINY))
    ours = ours_from(ref.state_dict(), UNET_TINY)
    weights = ref.state_dict()
    with torch.no_grad():
        for layer, (down, up, alpha) in state.items():
            weights[f"{layer}.weight"] += scale * alpha / down.shape[0] * up @ down
    ref.load_state_dict(weights)
    return ref, ours


def unet_inputs():
    from cinematic.models.unet3d import UNET_TINY
    from tests.test_unet3d import inputs

    torch.manual_seed(1)
    return inputs(UNET_TINY, 2, 3, 8, 8)


@pytest.mark.parametrize("layout", ["peft", "attention_processor", "lora_compatible_linear"])
def test_diffusers_adapter_layouts_match_diffusers(layout: str, tmp_path: Path):
    """An adapter written in each of diffusers' UNet layouts loads onto our UNet, unmerged, and gives the output of
    diffusers' UNet3DConditionModel with the update folded in by hand."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    from cinematic.lora_loading import load_lora
    from cinematic.models.unet3d import UNET_TINY, UNet3D

    rank, alpha = 2, (3.0 if layout == "peft" else 2.0)  # the older layouts carry no alpha: alpha = rank
    state = random_adapter(UNet3D(UNET_TINY), rank=rank, alpha=alpha, seed=3)
    ref, ours = diffusers_reference(state, scale=0.7)
    if layout == "peft":  # diffusers' own writer, as save_lora_weights writes PEFT-era LoRAs
        layers = {}
        for layer, (down, up, _) in state.items():
            layers[f"{layer}.lora_A.weight"], layers[f"{layer}.lora_B.weight"] = down, up
        StableDiffusionLoraLoaderMixin.save_lora_weights(
            tmp_path, unet_lora_layers=layers, unet_lora_adapter_metadata={"r": rank, "lora_alpha": alpha}
        )
        path = tmp_path / FILE_NAME
    else:  # the attention-processor LoRAs of UNet.save_attn_procs, and LoRACompatibleLinear's ".lora." keys
        keys = {}
        for layer, (down, up, _) in state.items():
            attention, _, projection = layer.partition(".to_")
            for part, tensor in (("down", down), ("up", up)):
                if layout == "attention_processor":
                    processor = "to_out_lora" if projection == "out.0" else f"to_{projection}_lora"
                    keys[f"{attention}.processor.{processor}.{part}.weight"] = tensor.contiguous()
                else:
                    keys[f"unet.{layer}.lora.{part}.weight"] = tensor.contiguous()
        path = tmp_path / "adapter.safetensors"
        save_file(keys, str(path))
    load_lora(ours, path, scale=0.7)
    x, t, context = unet_inputs()
    with torch.no_grad():
        expected = ref(x, t, context).sample
        actual = ours(x, t, context)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_purple_renders_and_is_judged_only_when_asked_for():
    from cinematic.data.shapes import EXTRA_PALETTE, parse_caption, render_clip
    from cinematic.eval.judge import classify_colour, judge_video, score

    purple = "a purple square moving up"
    with pytest.raises(CinematicError, match="not a shapes caption"):
        parse_caption(purple)  # the 48 captions are unchanged
    assert parse_caption(purple, extra=True) == ("purple", "square", "up")
    assert classify_colour(EXTRA_PALETTE["purple"], extra=True) == "purple"
    assert classify_colour(EXTRA_PALETTE["purple"]) in ("blue", "red")  # the standard judge knows four colours
    for seed in range(3):
        verdict = judge_video(render_clip(purple, seed, extra=True), extra=True)
        assert score(verdict, purple, extra=True)["all"]
        standard = judge_video(render_clip("a blue circle moving left", seed), extra=True)
        assert standard.colour == "blue"


def test_a_lora_trains_from_a_folder_of_mp4_clips_with_captions(base: Path, tmp_path: Path):
    """The mechanics of scripts/lora_purple on tiny data: mp4 files + captions.jsonl in, an adapter out."""
    from recipes.lora_purple import PURPLE_CAPTIONS, write_clips

    from cinematic.train import TrainConfig, train

    captions = write_clips(tmp_path / "clips", per_caption=1)
    rows = [json.loads(line) for line in captions.read_text().splitlines()]
    assert {r["caption"] for r in rows} >= set(PURPLE_CAPTIONS) and all(
        (captions.parent / r["path"]).is_file() for r in rows
    )
    config = TrainConfig(tmp_path / "run", init=str(base), data=str(captions), lora=4, steps=3, **FAST)
    adapter = train(config)
    pipe = Pipeline.from_pretrained(base)
    plain = frames(pipe("a purple circle moving left", **GENERATE))
    pipe.load_lora(adapter)
    assert not torch.equal(frames(pipe("a purple circle moving left", **GENERATE)), plain)
