"""Training: the loss goes down in both stages, a resumed run is the uninterrupted run, checkpoints are models,
captioned video files train, freezing freezes, and bad input is one clear error.

Everything runs the tiny preset on 4-frame 32x32 clips (4x4 latents) on the CPU.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cinematic.data.files import read_captions
from cinematic.data.shapes import ShapesDataset
from cinematic.errors import CinematicError
from cinematic.train import TrainConfig, train
from cinematic.train.setup import TEMPORAL_MODULES
from cinematic.weights import load

CLIP = {"frames": 4, "height": 32, "width": 32}
FAST = {"batch_size": 2, "lr": 4e-3, "warmup_steps": 2, "progress": False, **CLIP}


@pytest.fixture(autouse=True)
def _one_thread():
    # The tiny networks' ops are far too small to gain from a second thread, and on a busy 2-core machine two
    # OpenMP threads wait on each other: one thread is ~10x faster here.
    torch.set_num_threads(1)


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]


def assert_went_down(values: list[float], factor: float) -> None:
    first, last = np.mean(values[:5]), np.mean(values[-5:])
    assert last < factor * first, f"loss went from {first:.4f} to {last:.4f} (first/last five steps)"


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory) -> Path:
    """A VAE trained for 30 steps on a few fixed shapes clips: the frozen VAE of the unet-stage tests."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("vae") / "run"
    clips = ShapesDataset(size=32, frames=4, length=4)
    config = TrainConfig(out, stage="vae", preset="tiny", steps=30, save_every=15, sample_every=30, **FAST)
    assert train(config, dataset=clips) == out / "model"
    return out


def test_vae_stage_loss_goes_down_and_sets_the_latent_scale(vae_run: Path):
    assert_went_down(losses(vae_run), 0.7)  # 0.43 to 0.50 for seeds 0, 1, 2
    scale = json.loads((vae_run / "model" / "model.json").read_text())["vae"]["scaling_factor"]
    assert scale != 0.18215 and 0.05 < scale < 20  # 1 / std of this VAE's latents, not SD's factor
    assert (vae_run / "samples" / "step-000030.mp4").is_file()  # originals | reconstructions


def test_unet_stage_loss_goes_down(vae_run: Path, tmp_path: Path):
    clips = ShapesDataset(size=32, frames=4, length=2)
    config = TrainConfig(tmp_path / "run", preset="tiny", vae=str(vae_run / "model"), steps=40, save_every=40, **FAST)
    train(config, dataset=clips)
    assert_went_down(losses(tmp_path / "run"), 0.8)  # 0.57 to 0.67 for seeds 0, 1, 2


def test_resume_continues_the_same_run_and_checkpoints_are_models(vae_run: Path, tmp_path: Path):
    common = {"init": str(vae_run / "model"), "steps": 6, "save_every": 3, "caption_dropout": 0.5, **FAST}
    straight = tmp_path / "straight"
    train(TrainConfig(straight, **common))
    sliced = tmp_path / "sliced"
    assert train(TrainConfig(sliced, stop_at=3, **common)).name == "checkpoint-000003"
    with pytest.raises(CinematicError, match="not empty"):
        train(TrainConfig(sliced, **common))
    assert train(TrainConfig(sliced, resume=True, **common)) == sliced / "model"

    assert losses(sliced) == losses(straight) and len(losses(straight)) == 6
    for name in ("unet", "text_encoder", "vae"):
        a = load_file(straight / "model" / f"{name}.safetensors")
        b = load_file(sliced / "model" / f"{name}.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), name
    # Only the newest checkpoint keeps the training state; every checkpoint is a model.
    assert not (straight / "checkpoint-000003" / "training_state.pt").exists()
    assert (straight / "latest").read_text().strip() == "checkpoint-000006"
    model = load(straight / "checkpoint-000003")
    assert model.config.defaults.frames == 4 and model.config.defaults.height == 32
    # The saved weights are the EMA ones, not the raw ones that the training state keeps for resuming.
    state = torch.load(straight / "checkpoint-000006" / "training_state.pt", weights_only=True)
    saved = load(straight / "checkpoint-000006").unet.state_dict()
    raw = state["networks"]["unet"]
    ema = {k.removeprefix("unet."): v for k, v in state["ema"].items() if k.startswith("unet.")}
    assert all(torch.equal(saved[k], ema[k]) for k in ema)
    assert not all(torch.equal(saved[k], raw[k]) for k in ema)


def write_clips(folder: Path, count: int = 3) -> list[str]:
    """Small mp4s of a bright square moving right, 10 frames of 40x48 (cropped and resized when loaded)."""
    from cinematic import video

    names = []
    (folder / "clips").mkdir()
    for i in range(count):
        frames = np.full((10, 40, 48, 3), 60 + 40 * i, dtype=np.uint8)
        for f in range(10):
            frames[f, 12:28, 2 + 3 * f : 18 + 3 * f] = (230, 200, 50)
        names.append(f"clips/clip{i}.mp4")
        video.write(folder / names[-1], frames, fps=8)
    return names


def test_video_files_with_jsonl_captions_train(vae_run: Path, tmp_path: Path):
    names = write_clips(tmp_path)
    lines = [json.dumps({"path": name, "caption": f"a yellow square moving right {i}"}) for i, name in enumerate(names)]
    (tmp_path / "captions.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    config = TrainConfig(out, data=str(tmp_path), vae=str(vae_run / "model"), preset="tiny", steps=3, **FAST)
    assert train(config) == out / "model"
    assert len(losses(out)) == 3
    assert (out / "model" / "tokenizer" / "vocab.json").is_file()  # learned from the three captions

    (tmp_path / "captions.csv").write_text("path,caption\n" + "".join(f"{n},clip {i}\n" for i, n in enumerate(names)))
    clips = read_captions(tmp_path / "captions.csv")
    assert [c.caption for c in clips] == ["clip 0", "clip 1", "clip 2"] and clips[2].path == tmp_path / names[2]


def test_training_temporal_layers_changes_only_them(vae_run: Path, tmp_path: Path):
    config = TrainConfig(tmp_path / "run", init=str(vae_run / "model"), parts="temporal", steps=2, ema_decay=0, **FAST)
    train(config)
    before, after = load(vae_run / "model"), load(tmp_path / "run" / "model")
    for network in ("unet", "text_encoder", "vae"):
        old, new = getattr(before, network).state_dict(), getattr(after, network).state_dict()
        for key in old:
            temporal = network == "unet" and any(m in key.split(".") for m in TEMPORAL_MODULES)
            if not temporal:
                assert torch.equal(old[key], new[key]), key
        if network == "unet":
            changed = [k for k in old if not torch.equal(old[k], new[k])]
            assert changed and all(any(m in k.split(".") for m in TEMPORAL_MODULES) for k in changed)


def test_text_lr_scale_sets_the_text_encoders_own_rate(vae_run: Path, tmp_path: Path):
    # At scale 0 the text encoder is in the optimizer (its own group) but does not move; the UNet does.
    config = TrainConfig(tmp_path / "run", init=str(vae_run / "model"), text_lr_scale=0.0, steps=2, ema_decay=0, **FAST)
    train(config)
    before, after = load(vae_run / "model"), load(tmp_path / "run" / "model")
    old, new = before.text_encoder.state_dict(), after.text_encoder.state_dict()
    assert all(torch.equal(old[k], new[k]) for k in old)
    old, new = before.unet.state_dict(), after.unet.state_dict()
    assert any(not torch.equal(old[k], new[k]) for k in old)
    with pytest.raises(CinematicError, match="text lr scale must be a finite number >= 0"):
        TrainConfig(tmp_path / "other", text_lr_scale=-1.0)


def test_sample_hook_sees_ema_weights_every_n_steps(vae_run: Path, tmp_path: Path):
    calls = []

    def sample_fn(model, step):
        assert not model.unet.training and not torch.is_grad_enabled()
        calls.append(step)

    config = TrainConfig(tmp_path / "run", init=str(vae_run / "model"), steps=4, sample_every=2, **FAST)
    train(config, sample_fn=sample_fn)
    assert calls == [2, 4]


def test_gradient_checkpointing_and_bf16_keep_the_loss(vae_run: Path, tmp_path: Path):
    common = {"init": str(vae_run / "model"), "steps": 2, **FAST}
    train(TrainConfig(tmp_path / "plain", **common))
    train(TrainConfig(tmp_path / "checkpointed", gradient_checkpointing=True, **common))
    train(TrainConfig(tmp_path / "bf16", precision="bf16", steps=1, init=common["init"], **FAST))
    plain = losses(tmp_path / "plain")
    # Recomputation replays the same dropout masks (checkpoint restores the RNG), so the result is the same.
    np.testing.assert_allclose(losses(tmp_path / "checkpointed"), plain, rtol=1e-6)
    np.testing.assert_allclose(losses(tmp_path / "bf16"), plain[:1], rtol=0.05)


def test_dropout_option_reaches_the_unet(vae_run: Path, tmp_path: Path):
    # Two steps: the temporal convs' zero-initialised last layer hides the masks from the first loss, and the first
    # update (its gradient does see them) makes the second loss differ.
    common = {"init": str(vae_run / "model"), "steps": 2, **FAST}
    train(TrainConfig(tmp_path / "none", dropout=0.0, **common))
    train(TrainConfig(tmp_path / "again", dropout=0.0, **common))
    train(TrainConfig(tmp_path / "half", dropout=0.5, **common))
    assert losses(tmp_path / "none") == losses(tmp_path / "again")
    assert losses(tmp_path / "half") != losses(tmp_path / "none")  # same batches, noise and t: only the masks differ
    with pytest.raises(CinematicError, match=r"dropout must be a number in \[0, 1\)"):
        TrainConfig(tmp_path / "bad", dropout=1.5)


def test_logit_normal_timesteps_centre_the_draws_and_uniform_keeps_its_draws():
    from cinematic.train.unet import draw_timesteps

    # uniform is exactly the draw it always was, so runs recorded before the option continue unchanged
    uniform = draw_timesteps(4096, 1000, torch.Generator().manual_seed(3), "uniform", 0.0, 1.0)
    assert torch.equal(uniform, torch.randint(0, 1000, (4096,), generator=torch.Generator().manual_seed(3)))
    middle = draw_timesteps(4096, 1000, torch.Generator().manual_seed(3), "logit-normal", 0.0, 1.0)
    assert middle.dtype == torch.int64 and 0 <= int(middle.min()) and int(middle.max()) <= 999
    # P(0.25 < sigmoid(z) < 0.75) = P(|z| < ln 3) = 0.73 for z ~ N(0, 1), against 0.5 for uniform draws
    assert 0.70 < float(((middle >= 250) & (middle < 750)).float().mean()) < 0.76
    assert 0.47 < float(((uniform >= 250) & (uniform < 750)).float().mean()) < 0.53
    later = draw_timesteps(4096, 1000, torch.Generator().manual_seed(3), "logit-normal", 1.0, 1.0)
    assert 0.68 < float(later.float().mean()) / 1000 < 0.71  # E[sigmoid(1 + z)] = 0.697


def test_timestep_sampling_reaches_the_loss_and_bad_values_are_refused(vae_run: Path, tmp_path: Path):
    common = {"init": str(vae_run / "model"), "steps": 1, **FAST}
    train(TrainConfig(tmp_path / "uniform", **common))
    train(TrainConfig(tmp_path / "late", timestep_sampling="logit-normal", timestep_mean=3.0, **common))
    assert losses(tmp_path / "late") != losses(tmp_path / "uniform")
    assert json.loads((tmp_path / "late" / "run.json").read_text())["timestep_sampling"] == "logit-normal"
    with pytest.raises(CinematicError, match="timestep sampling must be one of uniform, logit-normal, not 'cosine'"):
        TrainConfig(tmp_path / "a", timestep_sampling="cosine")
    with pytest.raises(CinematicError, match="timestep std must be positive, not 0"):
        TrainConfig(tmp_path / "b", timestep_std=0)
    with pytest.raises(CinematicError, match="timestep mean must be a finite number, not nan"):
        TrainConfig(tmp_path / "c", timestep_mean=float("nan"))


def bad_config(out: Path, data: str) -> TrainConfig:
    return TrainConfig(out, stage="vae", preset="tiny", data=data, steps=1, **FAST)


def test_bad_inputs_are_one_clear_error(tmp_path: Path):
    (tmp_path / "missing.jsonl").write_text(json.dumps({"path": "nowhere.mp4", "caption": "x"}) + "\n")
    with pytest.raises(CinematicError, match=r"missing.jsonl:1: video not found: .*nowhere.mp4"):
        train(bad_config(tmp_path / "a", str(tmp_path / "missing.jsonl")))

    (tmp_path / "broken.mp4").write_bytes(b"this is not a video" * 10)
    (tmp_path / "broken.jsonl").write_text(json.dumps({"path": "broken.mp4", "caption": "x"}) + "\n")
    with pytest.raises(CinematicError, match=r"cannot read video .*broken.mp4"):
        train(bad_config(tmp_path / "b", str(tmp_path / "broken.jsonl")))

    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(CinematicError, match="empty.csv lists no videos"):
        train(bad_config(tmp_path / "c", str(tmp_path / "empty.csv")))

    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("x")
    with pytest.raises(CinematicError, match="is not empty: pass --resume"):
        train(bad_config(tmp_path / "used", "shapes"))

    with pytest.raises(CinematicError, match="give --vae MODEL"):
        train(TrainConfig(tmp_path / "d", preset="tiny", steps=1, **FAST))
    with pytest.raises(CinematicError, match="cannot train 'unet' in the vae stage"):
        TrainConfig(tmp_path / "e", stage="vae", parts="unet")


def test_cli_parses_into_a_config_and_runs(tmp_path: Path, capsys):
    from cinematic.train.cli import add_train_parser

    parser = argparse.ArgumentParser(prog="cinematic")
    add_train_parser(parser.add_subparsers())
    out = tmp_path / "run"
    argv = ["train", "--out", str(out), "--stage", "vae", "--preset", "tiny", "--frames", "2", "--height", "32"]
    args = parser.parse_args([*argv, "--width", "32", "--steps", "1", "--train", "decoder", "--quiet"])
    args.run(args)
    assert f"wrote {out / 'model'}" in capsys.readouterr().out
    run = json.loads((out / "run.json").read_text())
    assert run["parts"] == "decoder" and run["progress"] is False and run["lr"] == TrainConfig(out).lr
