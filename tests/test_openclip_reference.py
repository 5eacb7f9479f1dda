"""The OpenCLIP conversion and the penultimate-layer cut against ModelScope's own ``FrozenOpenCLIPEmbedder``.

The reference is the modelscope package's embedder (pinned in pyproject) running ``open_clip_torch`` (pinned in
scripts/setup) on a tiny random CLIP saved the way ModelScope ships ``open_clip_pytorch_model.bin``. cinematic reads
that file through its ModelScope-layout reader (sizes from the tensors, heads from ``width // 64``), converts it and
must give the embedder's features within 1e-5 in float32, from open_clip's own tokens.

open_clip 2.24.0 is the reference because ModelScope's embedder feeds the resblocks sequence-first tensors
(``NLD -> LND``), which open_clip's text blocks take up to 2.24.0; from 2.26.0 they are batch-first and the same
code fails on the causal mask's shape.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import sys
import types
from pathlib import Path

import torch

from cinematic.models.text_encoder import TextEncoder
from cinematic.weights.files import read_torch
from cinematic.weights.modelscope_layout import openclip_text_config
from cinematic.weights.openclip import convert_openclip_text

# A ViT-H/14-shaped CLIP at toy width: the real vocabulary (open_clip's tokenizer emits ids up to 49407) and
# context, width 128 so that open_clip's ``heads`` and the reader's ``width // 64`` agree on 2 heads, 3 resblocks
# of which the embedder uses 2. The image tower is built by open_clip and deleted by the embedder; it is kept tiny.
TINY_ARCH = "cinematic-tiny-ViT-H-14"
TINY_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 28, "layers": 1, "width": 64, "head_width": 64, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 3},
}
PROMPTS = ["a panda playing guitar in times square", "An astronaut riding a horse, 4k", ""]


class _Inert:
    """Any torchvision name open_clip reads while importing or building its image transforms: constructing,
    calling or reading an attribute of one gives another, and it computes nothing."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __call__(self, *args, **kwargs) -> _Inert:
        return _Inert()

    def __getattr__(self, name: str) -> _Inert:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Inert()


def _inert_module(name: str) -> types.ModuleType:
    module = types.ModuleType(name)

    def attribute(attr: str) -> _Inert:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Inert()

    module.__getattr__ = attribute  # PEP 562: every other name in the module is an _Inert
    return module


@contextlib.contextmanager
def _torchvision_stand_in():
    """Import shim, for importing open_clip only (documented in docs/testing.md).

    open_clip imports torchvision at module level for two things outside the text tower: its image transforms
    (transform.py, built by ``create_model_and_transforms`` and never applied here) and freezing BatchNorm in ResNet
    image towers (utils.py, never called). torchvision's PyPI wheels pin a torch build other than the CPU torch
    this project installs, so it is not installed; while open_clip is imported, inert modules stand in for it and
    are removed from ``sys.modules`` afterwards, so nothing else in the process sees them. Nothing on the text
    path reads them. A real torchvision, where one is installed, is used instead.
    """
    if importlib.util.find_spec("torchvision") is not None:
        yield
        return
    names = ["torchvision", "torchvision.transforms", "torchvision.transforms.functional", "torchvision.ops"]
    names.append("torchvision.ops.misc")
    added = {name: _inert_module(name) for name in names if name not in sys.modules}
    sys.modules.update(added)
    try:
        yield
    finally:
        for name in added:
            sys.modules.pop(name, None)


def _reference_modules() -> tuple[types.ModuleType, type]:
    """open_clip and ModelScope's embedder class; an ImportError here fails the test (scripts/setup installs both)."""
    # transformers asks importlib.util.find_spec whether torchvision is installed, which a stand-in in sys.modules
    # (it has no spec) makes raise; it caches the answer, so it and what open_clip takes from it come first.
    import transformers
    from transformers import AutoConfig, AutoModel, AutoTokenizer, PretrainedConfig, modeling_outputs  # noqa: F401

    transformers.utils.is_torchvision_available()  # answered, and cached, before any stand-in exists
    with _torchvision_stand_in():
        import open_clip
        from modelscope.models.multi_modal.video_synthesis.text_to_video_synthesis_model import (
            FrozenOpenCLIPEmbedder,
        )
    found = importlib.metadata.version("open_clip_torch")
    assert found == "2.24.0", f"the reference is open_clip_torch 2.24.0 (scripts/setup), found {found}"
    return open_clip, FrozenOpenCLIPEmbedder


def _write_tiny_clip(open_clip: types.ModuleType, folder: Path) -> Path:
    """A random tiny CLIP from open_clip itself, every parameter moved off its initial value, saved as ModelScope
    ships ``open_clip_pytorch_model.bin`` (the whole model's state dict, image tower included)."""
    (folder / "configs").mkdir()
    (folder / "configs" / f"{TINY_ARCH}.json").write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(folder / "configs")
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_ARCH, device="cpu")
    with torch.no_grad():
        for p in model.parameters():  # LayerNorms start at 1 and 0, biases at 0: make every value count
            p.add_(torch.randn_like(p) * 0.1)
    path = folder / "open_clip_pytorch_model.bin"
    torch.save(model.state_dict(), path)
    return path


def test_matches_modelscope_frozen_openclip_embedder(tmp_path):
    open_clip, FrozenOpenCLIPEmbedder = _reference_modules()
    path = _write_tiny_clip(open_clip, tmp_path)
    reference = FrozenOpenCLIPEmbedder(arch=TINY_ARCH, version=str(path), device="cpu", layer="penultimate")
    assert len(reference.model.transformer.resblocks) == 3  # the embedder skips the last of them

    state = read_torch(path)
    config = openclip_text_config(state, path)
    assert (config.layers, config.heads, config.width, config.vocab_size) == (2, 2, 128, 49408)
    ours = TextEncoder(config).eval()
    ours.load_state_dict(convert_openclip_text(state, config.layers), strict=True)

    tokens = open_clip.tokenize(PROMPTS)  # [3, 77], padded with 0 after the end token
    random_tokens = torch.randint(0, config.vocab_size, (2, 77), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(PROMPTS)  # open_clip.tokenize, then the tower cut before its last block, then ln_final
        torch.testing.assert_close(ours(tokens), expected, rtol=1e-5, atol=1e-5)
        expected = reference.encode_with_transformer(random_tokens)
        torch.testing.assert_close(ours(random_tokens), expected, rtol=1e-5, atol=1e-5)
        # the cut matters: the full 3-block tower gives other features, so a conversion keeping it would fail
        reference.layer_idx = 0
        assert not torch.allclose(reference.encode_with_transformer(random_tokens), expected, atol=1e-3)
