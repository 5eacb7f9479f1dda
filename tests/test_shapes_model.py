"""The bundled ``shapes`` model: it fits the package, it draws what the captions say, and ``cinematic eval`` works.

Generation uses the defaults (DDIM, 50 steps, guidance 9) at the model's trained 16 x 32 x 32 clip, so these are
the numbers a user gets. Sampling is deterministic on the CPU, so the accuracy check below is not a flaky threshold:
the same weights give the same videos on every run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cinematic.cli import main
from cinematic.data.shapes import HELD_OUT, TRAIN_CAPTIONS
from cinematic.eval.judge import evaluate, judge_video
from cinematic.weights import BUNDLED_DIR

SHAPES = BUNDLED_DIR / "shapes"
MAX_BYTES = 25 * 1000 * 1000
# Every colour, shape and direction occurs among these six seen captions; with them, a blue square (the model's
# weakest caption: rounded corners, docs/shapes.md) and a caption held out of training.
CAPTIONS = (*TRAIN_CAPTIONS[::7], "a blue square moving down")
HELD_OUT_CAPTION = "a red circle moving left"
SEEDS = (0,)


@pytest.fixture(scope="module")
def pipe():
    from cinematic.pipeline import Pipeline

    return Pipeline.from_pretrained("shapes")


def test_bundled_model_fits_the_package():
    files = [p for p in SHAPES.rglob("*") if p.is_file()]
    assert {"model.json", "unet.safetensors", "text_encoder.safetensors", "vae.safetensors"} <= {p.name for p in files}
    assert sum(p.stat().st_size for p in files) <= MAX_BYTES


def test_defaults_are_the_trained_clip(pipe):
    d = pipe.model.config.defaults
    assert (d.frames, d.height, d.width, d.fps) == (16, 32, 32, 8)


def test_seen_captions_meet_the_seen_bar(pipe):
    """Issue 4's seen-set bar on seven seen captions: at least 90% all correct and each of colour, shape and
    direction at least 90% right, so with seven videos every one of them right; and the held-out caption right.

    `cinematic eval --seeds 4` measured this model at 94.4% all correct on the 40 seen captions (every miss a blue
    square read as a circle; docs/shapes.md), `--seeds 1` at 95.0%, and at 100% since the judge leaves rounded
    squares' unclear frames out (issue 23); a broken loader, sampler or decoder lands near chance on every attribute.
    """
    from cinematic.eval.videos import generate

    assert "a blue square moving down" in TRAIN_CAPTIONS and HELD_OUT_CAPTION in HELD_OUT
    captions = [*CAPTIONS, HELD_OUT_CAPTION]
    videos = {caption: [] for caption in captions}
    for seed in SEEDS:
        for caption, frames in zip(captions, generate(pipe, captions, seed)):
            assert frames.shape == (16, 32, 32, 3)
            videos[caption].append(frames)
    report = evaluate(videos)
    seen = report.seen
    assert seen.clips == len(CAPTIONS) * len(SEEDS)
    assert seen.all >= 0.9 and min(seen.colour, seen.shape, seen.direction) >= 0.9, report.table()
    assert report.held_out.clips == len(SEEDS) and report.held_out.all == 1.0, report.table()


def test_eval_command_prints_table_and_writes_json(tmp_path, capsys):
    path = tmp_path / "eval.json"
    captions = ["a red circle moving right", "a red circle moving left"]  # one seen, one held out
    assert main(["eval", "--captions", *captions, "--seeds", "1", "--json", str(path)]) == 0
    table = capsys.readouterr().out
    assert "| seen (train captions) | 1 |" in table and "| held out | 1 |" in table
    report = json.loads(path.read_text())
    assert report["settings"] == {
        **report["settings"],
        "seeds": 1,
        "num_inference_steps": 50,
        "guidance_scale": 9.0,
        "sampler": "ddim",
    }
    assert set(report["per_caption"]) == set(captions)
    assert report["seen"]["clips"] == 1 and report["held_out"]["clips"] == 1


def test_eval_counts_seeds_from_first_seed(tmp_path, capsys, monkeypatch):
    """A validation judge on other seeds than the reported 0 to 3: video s of a caption is seed s's video."""
    from cinematic.eval import videos as eval_videos

    seeds, real = [], eval_videos.generate
    monkeypatch.setattr(eval_videos, "generate", lambda pipe, captions, seed, **kw: seeds.append(seed) or real(
        pipe, captions, seed, **kw))  # fmt: skip
    caption, videos, path = "a red circle moving left", tmp_path / "videos", tmp_path / "eval.json"
    argv = ["eval", "--captions", caption, "--num-inference-steps", "2", "--device", "cpu"]
    assert main([*argv, "--first-seed", "100", "--seeds", "2", "--save-videos", str(videos), "--json", str(path)]) == 0
    assert seeds == [100, 101]  # the videos are made from these seeds' noise, not 0 and 1
    assert sorted(p.name for p in videos.iterdir()) == [f"a-red-circle-moving-left-{s}.mp4" for s in (100, 101)]
    settings = json.loads(path.read_text())["settings"]
    assert (settings["first_seed"], settings["seeds"]) == (100, 2)
    capsys.readouterr()
    assert main([*argv, "--first-seed", "-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --first-seed must be a seed from 0"), err


def test_eval_rejects_a_caption_outside_the_dataset(capsys):
    assert main(["eval", "--captions", "a purple cat", "--seeds", "1"]) == 2
    assert capsys.readouterr().err.startswith("error: not a shapes caption")


def test_judge_agrees_with_hand_labelled_clips(pipe):
    """The judge against what a person sees in generated clips (tests/shapes_labels.json: twelve clips of the
    bundled model, labelled by eye from a montage of their frames). Renders alone calibrated it to squares and
    circles sharper than the model draws. No clip may read as another shape than its label; a clip too close to call
    (no shape) is allowed once: the rounded blue squares sit near the no-shape band."""
    from cinematic.eval.videos import generate

    labels = json.loads((Path(__file__).parent / "shapes_labels.json").read_text())
    captions = labels["captions"]
    judged = {}
    for seed in sorted({label["seed"] for label in labels["labels"]}):
        for caption, frames in zip(captions, generate(pipe, captions, seed)):
            judged[caption, seed] = judge_video(frames).shape
    readings = [(label["caption"], label["seed"], label["shape"], judged[label["caption"], label["seed"]])
                for label in labels["labels"]]  # fmt: skip
    wrong = [r for r in readings if r[3] is not None and r[3] != r[2]]
    unclear = [r for r in readings if r[3] is None]
    assert not wrong and len(unclear) <= 1, readings
