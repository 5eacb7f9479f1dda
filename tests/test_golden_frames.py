"""Same videos, bit for bit: the SHA-256 of the frames (uint8 pixels, not a container) of a fixed list of calls.

The list was recorded before the core was reshaped (issue 21) and must pass unchanged after it: any change in what a
call computes, however small, changes a hash. A change that is meant to move the frames (new defaults, say)
re-records the list in the same commit and says by how much each call moved::

    CINEMATIC_RECORD_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden_frames.py

The calls go through the public Python API only, with the shapes model and a tiny random-weight diffusers folder;
short step counts keep the whole list to well under a minute.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cinematic import Pipeline
from tests.factories import make_diffusers_folder

RECORD = Path(__file__).with_name("golden_frames.json")
PROMPT = "a red circle moving left"
STEPS = 10


def clips(result) -> list:
    """The videos of a call, whatever container the call returns them in."""
    return list(result) if isinstance(result, list | tuple) else [result]


def digest(result) -> str:
    h = hashlib.sha256()
    for clip in clips(result):
        frames = clip.frames
        h.update(f"{list(frames.shape)}:{frames.dtype}".encode())
        h.update(frames.contiguous().numpy().tobytes())
    return h.hexdigest()


def picture_clip(frames: int, size: int, seed: int) -> torch.Tensor:
    """A smooth uint8 clip ``[F, H, W, 3]``: a bright disc drifting over a gradient (deterministic, no RNG state)."""
    g = torch.Generator().manual_seed(seed)
    colour = torch.randint(60, 255, (3,), generator=g).float()
    ys, xs = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    out = []
    for f in range(frames):
        cx, cy = size * (0.3 + 0.4 * f / max(frames - 1, 1)), size * 0.5
        disc = ((xs - cx) ** 2 + (ys - cy) ** 2 < (size * 0.2) ** 2).float()[..., None]
        background = torch.stack([xs, ys, xs + ys], -1) * (100 / size)
        out.append(background * (1 - disc) + colour * disc)
    return torch.stack(out).clamp(0, 255).round().to(torch.uint8)


@pytest.fixture(scope="module")
def shapes() -> Pipeline:
    return Pipeline.from_pretrained("shapes")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Pipeline:
    return Pipeline.from_pretrained(make_diffusers_folder(tmp_path_factory.mktemp("golden") / "model"))


@pytest.fixture(scope="module")
def adapter(shapes: Pipeline, tmp_path_factory) -> Path:
    """A rank-2 adapter in diffusers' PEFT layout over every self-attention query and cross-attention value."""
    g = torch.Generator().manual_seed(7)
    state = {}
    for name, module in shapes.model.unet.named_modules():
        if name.endswith(("attn1.to_q", "attn2.to_v")):
            state[f"unet.{name}.lora_A.weight"] = torch.randn(2, module.in_features, generator=g) * 0.3
            state[f"unet.{name}.lora_B.weight"] = torch.randn(module.out_features, 2, generator=g) * 0.3
    path = tmp_path_factory.mktemp("golden-lora") / "pytorch_lora_weights.safetensors"
    save_file(state, str(path))
    return path


def _loaded(**kwargs) -> Callable[[], Pipeline]:
    return lambda: Pipeline.from_pretrained("shapes", **kwargs)


# name -> (which pipeline, the call). "shapes-*" use the bundled model, "tiny-*" the random-weight folder.
CASES: dict[str, tuple[str, Callable]] = {
    "shapes-ddim": ("shapes", lambda p, a: p(PROMPT, steps=STEPS, seed=1)),
    "shapes-ddim-eta": ("shapes", lambda p, a: p(PROMPT, steps=STEPS, seed=2, eta=0.5)),
    "shapes-dpmpp_2m": ("shapes", lambda p, a: p(PROMPT, steps=STEPS, seed=3, sampler="dpmpp_2m")),
    "shapes-dpmpp_2m_karras": ("shapes", lambda p, a: p(PROMPT, steps=STEPS, seed=4, sampler="dpmpp_2m_karras")),
    "shapes-euler": ("shapes", lambda p, a: p(PROMPT, steps=STEPS, seed=5, sampler="euler")),
    "shapes-euler_ancestral": ("shapes", lambda p, a: p(PROMPT, steps=STEPS, seed=6, sampler="euler_ancestral")),
    "shapes-negative": ("shapes", lambda p, a: p(PROMPT, negative_prompt="a green square", steps=STEPS, seed=7)),
    "shapes-two-videos": ("shapes", lambda p, a: p(PROMPT, steps=STEPS, seed=8, num_videos=2)),
    "shapes-two-prompts": ("shapes", lambda p, a: p([PROMPT, "a blue square moving up"], steps=STEPS, seed=9)),
    "shapes-guidance-3": ("shapes", lambda p, a: p(PROMPT, steps=STEPS, seed=10, guidance_scale=3.0)),
    "shapes-v2v": (
        "shapes",
        lambda p, a: p(PROMPT, init_video=picture_clip(16, 32, 0), strength=0.6, steps=STEPS, seed=11),
    ),
    "shapes-v2v-frames": (
        "shapes",
        lambda p, a: p(PROMPT, init_video=picture_clip(20, 48, 1), num_frames=12, strength=0.4, steps=STEPS, seed=12),
    ),
    "shapes-first-frame": (
        "shapes",
        lambda p, a: p(PROMPT, init_image=picture_clip(1, 32, 2)[0], steps=STEPS, seed=13),
    ),
    "shapes-loop": ("shapes", lambda p, a: p(PROMPT, loop=True, steps=STEPS, seed=14)),
    "shapes-first-frame-loop": (
        "shapes",
        lambda p, a: p(PROMPT, init_image=picture_clip(1, 32, 3)[0], loop=True, steps=STEPS, seed=15),
    ),
    "shapes-48-frames": ("shapes", lambda p, a: p(PROMPT, num_frames=48, steps=STEPS, seed=16)),
    "shapes-prompt-schedule": (
        "shapes",
        lambda p, a: p(
            "",
            prompt_schedule="0: a red circle moving right | 24: a red circle moving left",
            num_frames=48,
            steps=STEPS,
            seed=17,
        ),
    ),  # fmt: skip
    "shapes-whole-clip-window": ("shapes", lambda p, a: p(PROMPT, num_frames=24, window=0, steps=STEPS, seed=18)),
    "shapes-cache": ("shapes", lambda p, a: p(PROMPT, cache_interval=3, cache_depth=1, steps=STEPS, seed=19)),
    "shapes-guidance-stop": ("shapes", lambda p, a: p(PROMPT, guidance_stop=0.5, steps=STEPS, seed=20)),
    "shapes-low-memory": ("shapes", lambda p, a: p(PROMPT, low_memory=True, steps=STEPS, seed=21)),
    "shapes-freeu": ("shapes", lambda p, a: p(PROMPT, freeu=True, steps=STEPS, seed=22)),
    "shapes-freeinit": ("shapes", lambda p, a: p(PROMPT, freeinit=1, steps=STEPS, seed=23)),
    "shapes-lora": ("shapes", lambda p, a: p(PROMPT, loras=[(a, 0.8)], steps=STEPS, seed=24)),
    "shapes-lora-merged": (
        "custom",
        lambda p, a: Pipeline.from_pretrained("shapes", loras=[(a, 0.8)], merge_loras=True)(
            PROMPT, steps=STEPS, seed=24
        ),
    ),
    "shapes-int8": ("custom", lambda p, a: _loaded(int8=True)()(PROMPT, steps=STEPS, seed=25)),
    "shapes-fp16-storage": (
        "custom",
        lambda p, a: _loaded(dtype=torch.float16, compute_dtype=torch.float32)()(PROMPT, steps=STEPS, seed=26),
    ),
    "shapes-no-winograd": ("custom", lambda p, a: _loaded(winograd=False)()(PROMPT, steps=STEPS, seed=27)),
    "tiny-ddim": ("tiny", lambda p, a: p(PROMPT, num_frames=4, steps=STEPS, seed=31)),
    "tiny-dpmpp-nonsquare": (
        "tiny",
        lambda p, a: p(PROMPT, num_frames=3, height=32, width=48, steps=STEPS, seed=32, sampler="dpmpp_2m"),
    ),
    "tiny-negative-two-videos": (
        "tiny",
        lambda p, a: p(PROMPT, negative_prompt="blurry", num_frames=3, num_videos=2, steps=STEPS, seed=33),
    ),
    "tiny-v2v": (
        "tiny",
        lambda p, a: p(PROMPT, init_video=picture_clip(4, 32, 4), strength=0.7, steps=STEPS, seed=34),
    ),
    "tiny-windowed": ("tiny", lambda p, a: p(PROMPT, num_frames=12, window=6, steps=4, seed=35)),
    "tiny-fast-modes": (
        "tiny",
        lambda p, a: p(
            PROMPT, num_frames=3, cache_interval=2, guidance_stop=0.8, low_memory=True, steps=STEPS, seed=36
        ),
    ),
}


def _expected() -> dict[str, str]:
    return json.loads(RECORD.read_text()) if RECORD.is_file() else {}


@pytest.mark.parametrize("name", list(CASES))
def test_frames_are_unchanged(name: str, request, adapter):
    which, call = CASES[name]
    pipe = request.getfixturevalue(which) if which != "custom" else None
    got = digest(call(pipe, adapter))
    if os.environ.get("CINEMATIC_RECORD_GOLDEN"):
        recorded = _expected()
        recorded[name] = got
        RECORD.write_text(json.dumps(dict(sorted(recorded.items())), indent=1) + "\n")
        return
    expected = _expected()
    assert name in expected, f"no recorded hash for {name}: record with CINEMATIC_RECORD_GOLDEN=1"
    assert got == expected[name], f"{name}: the frames changed"


def test_the_list_is_complete():
    assert set(_expected()) == set(CASES)
