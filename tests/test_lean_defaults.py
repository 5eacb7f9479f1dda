"""The lean CPU mode is the default (issue 22): half-precision files stay half precision and compute in fp32, the
guidance passes run one after the other, the CLI frees the text encoder; a run that would not fit switches to the
low-memory path or is refused before it starts."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

import pytest
import torch

from cinematic.cli import main
from cinematic.generation import memory
from cinematic.models.precision import storage_dtype
from cinematic.pipeline import Memory, Pipeline
from tests.factories import make_diffusers_folder

PROMPT = "a red cat riding a horse on the beach"
SMALL = dict(num_frames=3, height=32, width=32, num_inference_steps=4, seed=8, progress=False)


@pytest.fixture(scope="module")
def fp16_folder(tmp_path_factory):
    return make_diffusers_folder(tmp_path_factory.mktemp("lean16") / "model", variant="fp16")


@pytest.fixture
def as_if_large(monkeypatch):
    """The tiny model treated as the published one is: its weights over the lean threshold, its steps over the
    batching threshold, so that the defaults take the lean path they take at full size."""
    from cinematic.generation import loading

    monkeypatch.setattr(loading, "LEAN_BYTES", 0)
    monkeypatch.setattr(memory, "BATCH_BELOW", 0)


def frames(videos) -> torch.Tensor:
    return torch.stack([v.frames for v in videos])


def test_fp16_files_stay_fp16_and_compute_in_fp32_by_default(fp16_folder, as_if_large):
    lean = Pipeline.from_pretrained(fp16_folder, variant="fp16")
    assert lean.dtype == torch.float32
    for network in ("unet", "text_encoder", "vae"):
        assert storage_dtype(getattr(lean.model, network)) == torch.float16
    assert lean.memory == Memory(batched_guidance=None)  # and the VAE's frames per call by their size
    request = lean.validate(PROMPT, **{k: v for k, v in SMALL.items() if k != "progress"})
    assert lean.fit(request).batched_guidance is False  # a large step: the passes one after the other
    fp32_files = make_diffusers_folder(fp16_folder.parent / "fp32")
    assert Pipeline.from_pretrained(fp32_files).model.unet.conv_in.weight.dtype == torch.float32  # fp32 stays


def test_the_vae_decodes_small_frames_several_at_a_time_on_a_cpu():
    default_decode_chunk, cpu = memory.default_decode_chunk, torch.device("cpu")
    assert default_decode_chunk(cpu, 256 * 256) == default_decode_chunk(cpu, 1024 * 576) == 1  # full size: one
    assert default_decode_chunk(cpu, 32 * 32) == 64  # the shapes model: a 16-frame clip in one call
    cuda = torch.device("cuda")
    assert default_decode_chunk(cuda, 32 * 32) == default_decode_chunk(cuda, 256 * 256) == 8


def test_a_small_model_keeps_fp32_and_batched_guidance(fp16_folder):
    from cinematic.generation.loading import default_dtypes

    assert default_dtypes(fp16_folder, torch.device("cpu"), "fp16") == (torch.float32, torch.float32)
    assert default_dtypes("shapes", torch.device("cpu")) == (torch.float32, torch.float32)  # 6 MB of fp16 files
    pipe = Pipeline.from_pretrained("shapes")
    request = pipe.validate("a red circle moving left", num_inference_steps=2, seed=0)
    assert pipe.fit(request).batched_guidance is True  # small steps: one batch is faster


def test_the_default_video_equals_the_same_mode_from_fp32_copies_bit_for_bit(fp16_folder, as_if_large):
    lean = Pipeline.from_pretrained(fp16_folder, variant="fp16")
    copies = Pipeline.from_pretrained(fp16_folder, variant="fp16", dtype=torch.float32)  # fp16 values, held as fp32
    assert copies.memory == lean.memory
    assert torch.equal(frames(lean(PROMPT, **SMALL)), frames(copies(PROMPT, **SMALL)))


def test_the_default_video_is_within_float_rounding_of_the_old_default(fp16_folder, as_if_large):
    lean = Pipeline.from_pretrained(fp16_folder, variant="fp16")
    old = Pipeline.from_pretrained(fp16_folder, variant="fp16", dtype=torch.float32)  # fp32, batched guidance
    old_frames = frames(old(PROMPT, memory=Memory(), **SMALL))
    assert (frames(lean(PROMPT, **SMALL)).int() - old_frames.int()).abs().max() <= 1


def test_a_run_that_only_fits_in_low_memory_mode_switches_to_it(fp16_folder, monkeypatch, caplog):
    pipe = Pipeline.from_pretrained(fp16_folder, variant="fp16")
    request = pipe.validate(PROMPT, **{k: v for k, v in SMALL.items() if k != "progress"})
    footprint = memory.Footprint.of(pipe)
    plan = memory.resolve(footprint, request.settings, request.count, pipe.memory)
    default, low = (footprint.need(request.settings, request.count, m).peak for m in (plan, Memory.low()))
    assert low < default
    monkeypatch.setattr(memory, "available_bytes", lambda: (low + default) // 2)
    with caplog.at_level(logging.WARNING, logger="cinematic"):
        assert pipe.fit(request) == Memory.low()
    assert "running in low-memory mode" in caplog.text
    monkeypatch.setattr(memory, "available_bytes", lambda: default + 1)
    assert pipe.fit(request) == plan  # room enough: the default stays
    pipe.check_memory = False
    monkeypatch.setattr(memory, "available_bytes", lambda: 1)
    assert pipe.fit(request) == plan  # the check turned off


def test_a_run_that_cannot_fit_is_refused_in_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(memory, "available_bytes", lambda: 1000)
    out = tmp_path / "clip.mp4"
    assert (
        main(["generate", "a red circle moving left", "--num-inference-steps", "2", "--seed", "1", "-o", str(out)]) == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: not enough memory: this video needs about"), err
    assert "is free" in err[0] and not out.exists() and list(tmp_path.iterdir()) == []


def test_a_forced_mode_that_does_not_fit_says_which_would(fp16_folder, monkeypatch):
    from cinematic.errors import CinematicError

    pipe = Pipeline.from_pretrained(fp16_folder, variant="fp16")
    request = pipe.validate(PROMPT, **{k: v for k, v in SMALL.items() if k != "progress"})
    batched = Memory()
    monkeypatch.setattr(
        memory,
        "available_bytes",
        lambda: memory.Footprint.of(pipe).need(request.settings, request.count, Memory.low()).peak + 1,
    )
    with pytest.raises(CinematicError, match=r"low-memory mode \(low_memory=True, --low-memory\) would fit"):
        pipe.fit(request, batched)


def test_the_estimate_grows_with_the_clip_and_the_batch():
    one = memory.estimate(320, 16 * 32 * 32, 1, 256 * 256, 4, False, 1)
    assert memory.estimate(320, 32 * 32 * 32, 1, 256 * 256, 4, False, 1).steps == 2 * one.steps
    assert memory.estimate(320, 16 * 32 * 32, 2, 256 * 256, 4, False, 1).steps == 2 * one.steps
    assert memory.estimate(320, 16 * 32 * 32, 1, 256 * 256, 4, True, 1).steps < one.steps
    # The measured full-size run (16 frames, 256x256, one conditional pass): 1.30 GiB over the weights.
    assert 1.30 * 2**30 <= one.steps <= 1.30 * 2**30 * memory.MARGIN * 1.05


def test_an_address_space_limit_counts_as_what_is_available():
    code = textwrap.dedent(
        """
        import resource
        from cinematic.generation import memory
        used = memory._rlimit_headroom()
        assert used is None  # no limit set
        import os
        pages = int(open("/proc/self/statm").read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        resource.setrlimit(resource.RLIMIT_AS, (pages + 300 * 2**20, resource.RLIM_INFINITY))
        headroom = memory.available_bytes()
        assert 200 * 2**20 < headroom <= 300 * 2**20, headroom
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_the_cli_frees_the_text_encoder_and_the_server_keeps_it(fp16_folder, monkeypatch):
    from cinematic import cli

    made = []
    original = Pipeline.from_pretrained

    def spy(*args, **kwargs):
        made.append(original(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(Pipeline, "from_pretrained", spy)
    args = cli.build_parser().parse_args(["generate", "x", "--model", str(fp16_folder)])
    pipe = cli._load_pipeline(args, "cpu", [])
    assert pipe.memory.free_text_encoder and pipe.memory.batched_guidance is None and pipe.check_memory
    assert not Pipeline.from_pretrained(fp16_folder, variant="fp16").memory.free_text_encoder  # library, server
