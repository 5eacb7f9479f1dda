"""Data-parallel training (issue 26): ``torchrun`` processes on the gloo backend train as one process with the same
global batch, stop and resume exactly (on the same or another number of processes), only rank 0 writes, a failing
rank ends the run with its error; cached latents give the loss of the uncached run and are reused; the 8-bit
optimizer is refused where it cannot run.

Every run is the tiny preset on 4-frame 32x32 clips, a few steps, on the CPU with one thread per process. The
multi-process runs are real ``torchrun`` launches (``torch.distributed.run --standalone``: a free port each) of
``tests/dist_worker.py``, which is ``cinematic`` plus the write recorder and the failure injection.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cinematic.data.shapes import ShapesDataset
from cinematic.errors import CinematicError
from cinematic.train import TrainConfig, train

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "dist_worker.py"
CLIP = {"frames": 4, "height": 32, "width": 32}
# dropout 0: the networks' own dropout masks are the one draw made per rank (docs/training.md#many-processes)
COMMON = {"lr": 1e-3, "warmup_steps": 2, "caption_dropout": 0.5, "dropout": 0.0, "save_every": 2, **CLIP}
TIMEOUT = 120  # seconds for one torchrun launch; a hang fails the test instead of blocking the suite


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A complete tiny model (random UNet and text encoder, a VAE after one step, a tokenizer of the captions)."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("model") / "run"
    clips = ShapesDataset(size=32, frames=4, length=4)
    config = TrainConfig(out, stage="vae", preset="tiny", steps=1, batch_size=2, progress=False, **CLIP)
    return train(config, dataset=clips)


def flags(config: dict) -> list[str]:
    """``cinematic train`` flags for the TrainConfig fields in ``config``."""
    argv = []
    for key, value in config.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif key == "progress" and value is False:
            argv.append("--quiet")
        else:
            argv += [flag, str(value)]
    return argv


def torchrun(
    out: Path, processes: int, env: dict | None = None, command_name: str = "train", **config
) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node processes tests/dist_worker.py train --out OUT ...`` (or ``distill``), one thread
    per process."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    command += [str(WORKER), command_name, "--out", str(out), *flags(config)]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, env=environment, cwd=REPO)


def ran(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return {
        f"{n}.{k}": v
        for n in ("unet", "text_encoder", "vae")
        for k, v in load_file(folder / f"{n}.safetensors").items()
    }


def assert_same_weights(a: Path, b: Path, atol: float = 0.0, skip: str | None = None) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    worst = max(float((wa[k] - wb[k]).abs().max()) for k in wa if skip is None or not k.endswith(skip))
    assert worst <= atol, f"weights differ by up to {worst:.3g} (allowed {atol})"


@pytest.fixture(scope="module")
def runs(model: Path, tmp_path_factory) -> dict[str, Path]:
    """Global batch 4 for 4 steps: one process of 2 x 2 accumulation, and two processes of 2 (recording what each
    rank writes); and a two-process run stopped at step 2 (resumed by the tests)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("runs")
    config = {"init": str(model), "steps": 4, **COMMON}
    train(TrainConfig(root / "one", batch_size=2, grad_accum=2, progress=False, **config))
    (root / "writes").mkdir()
    two = ran(torchrun(root / "two", 2, {"CINEMATIC_TEST_WRITES": str(root / "writes")}, batch_size=2, **config))
    (root / "two.stderr").write_text(two.stderr)
    ran(torchrun(root / "stopped", 2, batch_size=2, stop_at=2, progress=False, **config))
    return {"root": root, "one": root / "one", "two": root / "two", "stopped": root / "stopped", "config": config}


def test_two_processes_train_as_one_process_with_the_same_global_batch(runs):
    np.testing.assert_allclose(losses(runs["two"]), losses(runs["one"]), rtol=1e-5)
    assert len(losses(runs["two"])) == 4
    assert_same_weights(runs["two"] / "model", runs["one"] / "model", atol=1e-5)
    assert "global batch 4 = 2 per process x 2 processes x 1 accumulation" in (runs["root"] / "two.stderr").read_text()
    run = json.loads((runs["two"] / "run.json").read_text())
    assert run["processes"] == 2 and run["global_batch"] == 4
    state = torch.load(runs["two"] / "checkpoint-000004" / "training_state.pt", weights_only=True)
    assert (state["global_batch"], state["world_size"], state["batch_size"], state["grad_accum"]) == (4, 2, 2, 1)


def test_only_rank_zero_writes(runs):
    out = str(runs["two"].resolve())
    written = {rank: json.loads((runs["root"] / "writes" / f"rank-{rank}.json").read_text()) for rank in (0, 1)}
    inside = {rank: [p for p in paths if str(Path(p).resolve()).startswith(out)] for rank, paths in written.items()}
    assert inside[1] == [], inside[1][:5]
    assert any(p.endswith("training_state.pt") for p in inside[0])  # the recorder does see rank 0's writes
    assert any(p.endswith("log.jsonl") for p in inside[0])


def test_a_stopped_two_process_run_resumes_exactly(runs, tmp_path: Path):
    resumed = tmp_path / "resumed"
    shutil.copytree(runs["stopped"], resumed)
    ran(torchrun(resumed, 2, batch_size=2, resume=True, progress=False, **runs["config"]))
    assert losses(resumed) == losses(runs["two"])
    assert_same_weights(resumed / "model", runs["two"] / "model")  # bit for bit


def test_a_two_process_checkpoint_resumes_in_one_process(runs, tmp_path: Path, capsys):
    resumed = tmp_path / "resumed"
    shutil.copytree(runs["stopped"], resumed)
    with pytest.raises(CinematicError, match=r"global batch of 4 \(2 per process x 2 processes x 1 accumulation\)"):
        train(TrainConfig(resumed, batch_size=2, resume=True, progress=False, **runs["config"]))
    assert train(TrainConfig(resumed, batch_size=4, resume=True, progress=False, **runs["config"])) == resumed / "model"
    said = capsys.readouterr().err
    assert "as 4 per process x 1 processes x 1 accumulation, not 2 per process x 2 processes" in said
    np.testing.assert_allclose(losses(resumed), losses(runs["two"]), rtol=1e-5)
    assert_same_weights(resumed / "model", runs["two"] / "model", atol=1e-5)


def test_a_failing_rank_stops_the_run_with_its_error(model: Path, tmp_path: Path):
    began = time.monotonic()
    config = {"init": str(model), "steps": 50, "batch_size": 1, "progress": False, **COMMON}
    result = torchrun(tmp_path / "run", 2, {"CINEMATIC_TEST_FAIL": "1:3"}, **config)
    assert result.returncode != 0
    assert "error: rank 1 of 2: cannot read clip" in result.stderr
    assert time.monotonic() - began < TIMEOUT
    assert not (tmp_path / "run" / "model").exists()


def test_cached_latents_give_the_uncached_loss_and_are_reused(model: Path, tmp_path: Path, monkeypatch):
    from cinematic.models.vae import VAE

    clips = ShapesDataset(size=32, frames=4, length=6)
    # the text encoder is frozen (--train unet), so its features are cached too
    config = {"init": str(model), "steps": 3, "batch_size": 2, "parts": "unet", "progress": False, **COMMON}
    train(TrainConfig(tmp_path / "plain", **config), dataset=clips)
    cache = tmp_path / "cache"
    train(TrainConfig(tmp_path / "cached", cache_latents=str(cache), **config), dataset=clips)
    np.testing.assert_allclose(losses(tmp_path / "cached"), losses(tmp_path / "plain"), rtol=1e-5)
    entries = sorted(cache.glob("*/*.safetensors"))
    assert len(entries) == 7  # the 6 clips the run used (3 steps x 2 = 6 of 6) and the empty caption's features
    assert set(load_file(entries[0])) == {"mean", "logvar", "context"}

    def no_encoding(*args, **kwargs):
        raise AssertionError("the VAE encoded a clip that is in the cache")

    monkeypatch.setattr(VAE, "encode_moments", no_encoding)
    train(TrainConfig(tmp_path / "again", cache_latents=str(cache), **config), dataset=clips)
    assert losses(tmp_path / "again") == losses(tmp_path / "cached")
    assert sorted(cache.glob("*/*.safetensors")) == entries


def test_the_cache_holds_latents_only_while_the_text_encoder_trains(model: Path, tmp_path: Path):
    clips = ShapesDataset(size=32, frames=4, length=2)
    config = {"init": str(model), "steps": 1, "batch_size": 2, "progress": False, **COMMON}
    train(TrainConfig(tmp_path / "plain", **config), dataset=clips)
    train(TrainConfig(tmp_path / "cached", cache_latents=str(tmp_path / "cache"), **config), dataset=clips)
    np.testing.assert_allclose(losses(tmp_path / "cached"), losses(tmp_path / "plain"), rtol=1e-5)
    (entry,) = [p for p in (tmp_path / "cache").glob("*/*.safetensors") if p.stem != "empty"][:1]
    assert set(load_file(entry)) == {"mean", "logvar"}


def test_the_8bit_optimizer_is_refused_where_it_cannot_run(model: Path, tmp_path: Path, monkeypatch):
    from cinematic.cli import main
    from cinematic.train.optimizers import check_optimizer

    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--init", str(model), "--optimizer", "adamw8bit", "--device", "cpu"]) == 2
    assert not out.exists()  # refused before anything was written
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    with pytest.raises(CinematicError, match="--optimizer adamw8bit needs bitsandbytes: pip install bitsandbytes"):
        check_optimizer("adamw8bit", torch.device("cuda"))
    with pytest.raises(CinematicError, match="optimizer must be one of adamw, adamw8bit, not 'sgd'"):
        TrainConfig(out, optimizer="sgd")


def test_the_8bit_optimizer_error_is_one_line(model: Path, tmp_path: Path, capsys):
    from cinematic.cli import main

    main(["train", "--out", str(tmp_path / "run"), "--init", str(model), "--optimizer", "adamw8bit", "--device", "cpu"])
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        "error: --optimizer adamw8bit runs on CUDA devices only (bitsandbytes), not on cpu; use --optimizer adamw"
    ]


def test_fsdp_on_two_processes_trains_as_one_and_checkpoints_ordinary_models(runs, tmp_path: Path):
    from cinematic.weights import load

    out = tmp_path / "fsdp"
    ran(torchrun(out, 2, batch_size=2, fsdp=True, stop_at=2, progress=False, **runs["config"]))
    np.testing.assert_allclose(losses(out), losses(runs["two"])[:2], rtol=1e-5)
    model = load(out / "checkpoint-000002")  # whole weights, in cinematic's format
    assert model.config.defaults.frames == 4
    # its (whole) training state resumes without FSDP, in one process, and continues the run
    train(TrainConfig(out, batch_size=4, resume=True, progress=False, **runs["config"]))
    np.testing.assert_allclose(losses(out), losses(runs["two"]), rtol=1e-5)
    # Left out: the text encoder's key biases. Their gradient is zero but for rounding (softmax ignores a shift
    # shared by all keys), and Adam turns that rounding noise into steps of about lr, in whichever direction the
    # noise points; FSDP's reduce-scatter rounds differently from DDP's all-reduce. Every other weight: within 1e-5.
    assert_same_weights(out / "model", runs["two"] / "model", atol=1e-5, skip="self_attn.k_proj.bias")


def test_settings_that_do_not_go_together_are_refused(tmp_path: Path):
    with pytest.raises(CinematicError, match="--fsdp shards full fine-tunes"):
        TrainConfig(tmp_path, init="shapes", lora=4, fsdp=True)
    with pytest.raises(CinematicError, match="--fsdp shards the unet stage's networks, without sample videos"):
        TrainConfig(tmp_path, fsdp=True, sample_every=10)
    with pytest.raises(CinematicError, match="--cache-latents caches the VAE latents that the unet stage trains on"):
        TrainConfig(tmp_path, stage="vae", cache_latents=str(tmp_path / "cache"))


def test_distill_runs_on_the_same_launcher_and_two_processes_distil_as_one(model: Path, tmp_path: Path):
    """``torchrun ... -m cinematic distill``: the LoRA student of two processes of batch 1 is that of one process of
    batch 2, step for step."""
    from cinematic.train.config import DistillConfig
    from cinematic.train.distill import distill

    common = {"steps": 2, "lora": 4, "lr": 1e-3, "warmup_steps": 1, "save_every": 2, **CLIP}
    distill(DistillConfig(tmp_path / "one", init=str(model), batch_size=2, progress=False, **common))
    ran(torchrun(tmp_path / "two", 2, command_name="distill", model=str(model), batch_size=1, **common))
    np.testing.assert_allclose(losses(tmp_path / "two"), losses(tmp_path / "one"), rtol=1e-5)
    a, b = (load_file(tmp_path / run / "model" / "pytorch_lora_weights.safetensors") for run in ("one", "two"))
    assert a.keys() == b.keys()
    diffs = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    # Most weights agree to rounding; Adam divides by the gradient's own size, so where a gradient is next to zero
    # (the up matrices after one update) gloo's all-reduce rounding becomes a step of a fraction of lr
    # (measured: at most 1.8e-4 at lr 1e-3, on weights of 1.8e-3).
    assert float(diffs.median()) <= 1e-6 and float(diffs.max()) <= 0.25 * common["lr"], (diffs.median(), diffs.max())
