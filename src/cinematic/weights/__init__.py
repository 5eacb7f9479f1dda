"""Finding a model (local folder, bundled name or hub id), recognising its layout, and loading it strictly.

Every network is built on the ``meta`` device and its weights assigned in place, one network at a time, so loading
never holds a randomly initialised copy beside the real weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

from cinematic.errors import CinematicError
from cinematic.weights.source import Source, has_tokenizer

LAYOUT_MARKERS = {
    "model.json": "cinematic",
    "model_index.json": "diffusers",
    "configuration.json": "modelscope",
}
BUNDLED_DIR = Path(__file__).resolve().parent.parent / "assets"
# In-place methods that only write values (what torch.nn.init's functions call), skipped on meta by _SkipInit.
_FILLS = ("uniform_", "normal_", "fill_", "zero_", "erfinv_", "mul_", "add_", "clamp_", "copy_")


def resolve(model: str | Path) -> Path:
    """A local folder for ``model``: a path, a bundled model name, or a Hugging Face hub id."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CinematicError(f"{path} is a file; a model is a folder (cinematic, diffusers or ModelScope layout)")
        return path
    bundled = BUNDLED_DIR / str(model)
    if "/" not in str(model) and (bundled / "model.json").is_file():
        return bundled
    from cinematic.weights import hub

    if hub.is_hub_id(str(model)):
        return hub.download(str(model))
    raise CinematicError(f"no such model: {model} is neither a folder, a bundled model name, nor a hub id (owner/name)")


def detect(folder: Path) -> str:
    for marker, layout in LAYOUT_MARKERS.items():
        if (folder / marker).is_file():
            return layout
    raise CinematicError(
        f"{folder} has no known layout: expected model.json (cinematic), model_index.json (diffusers) "
        "or configuration.json (ModelScope)"
    )


def open_source(model: str | Path, variant: str | None = None) -> Source:
    folder = resolve(model)
    layout = detect(folder)
    if layout == "cinematic":
        from cinematic.weights.native import read_native

        return read_native(folder)
    if layout == "diffusers":
        from cinematic.weights.diffusers_layout import read_diffusers

        return read_diffusers(folder, variant)
    from cinematic.weights.modelscope_layout import read_modelscope

    return read_modelscope(folder)


def tokenizer_folder(source: Source, tokenizer: str | Path | None = None) -> Path:
    """Where the vocabulary comes from: an explicit path, the model folder, or the hub (cache first)."""
    if tokenizer is not None:
        path = Path(tokenizer)
        if not has_tokenizer(path) and has_tokenizer(path / "tokenizer"):
            path = path / "tokenizer"
        if not has_tokenizer(path):
            raise CinematicError(f"tokenizer {tokenizer}: expected vocab.json and merges.txt in that folder")
        return path
    if source.tokenizer is not None and has_tokenizer(source.tokenizer):
        return source.tokenizer
    from cinematic.weights import hub

    return hub.download_tokenizer()


def build_networks(config, device: torch.device | str = "cpu"):
    """The three networks of ``config`` on the meta device (no memory), ready for ``load_into``."""
    from cinematic.models.text_encoder import TextEncoder
    from cinematic.models.unet3d import UNet3D
    from cinematic.models.vae import VAE

    with torch.device("meta"), _SkipInit():
        return {"unet": UNet3D(config.unet), "text_encoder": TextEncoder(config.text_encoder), "vae": VAE(config.vae)}


class _SkipInit(TorchFunctionMode):
    """No weight initialisation while building on meta: the weights are about to be assigned, and some initialisers
    (nn.Embedding's normal_) make PyTorch import torch._dynamo for meta tensors, which costs seconds.

    A torch function mode rather than replacing ``torch.nn.init``'s functions: modes live on the calling thread's
    stack, so another thread building or initialising a network at the same time is untouched. The mode drops the
    initialisers (the ``torch.nn.init`` functions that dispatch to modes) and the value-writing in-place methods they
    call, and only on meta tensors, which hold no values to write; every other call runs as usual.
    """

    SKIPPED = frozenset(
        [fn for name, fn in vars(torch.nn.init).items() if name.endswith("_") and not name.startswith("_")]
        + [getattr(torch.Tensor, name) for name in _FILLS]
    )

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = args[0] if args else kwargs.get("tensor")
        if func in self.SKIPPED and isinstance(target, torch.Tensor) and target.is_meta:
            return target
        return func(*args, **kwargs)


def load(
    model: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    tokenizer: str | Path | None = None,
    variant: str | None = None,
):
    """Load any supported model into a :class:`cinematic.models.components.Model`."""
    from cinematic.models.components import Model
    from cinematic.tokenizer import Tokenizer
    from cinematic.weights.files import load_into

    source = open_source(model, variant=variant)
    vocab = Tokenizer.from_folder(tokenizer_folder(source, tokenizer), source.config.text_encoder.context_length)
    networks = build_networks(source.config)
    for name, network in networks.items():
        load_into(network, source.readers[name](dtype), f"{source.files[name]}", dtype, device)
        network.eval()
    return Model(source.config, **networks, tokenizer=vocab, source=str(source.folder), format=source.format)


def convert(src: str | Path, dst: str | Path, dtype: torch.dtype = torch.float16, tokenizer: str | Path | None = None):
    """Write any supported model in cinematic's format, checking every key and shape on the way."""
    from cinematic.weights.files import check_state_dict
    from cinematic.weights.native import prepare_destination, write_native

    prepare_destination(Path(dst))
    source = open_source(src)
    vocab_dir = tokenizer_folder(source, tokenizer)
    networks = build_networks(source.config)

    def checked(name: str):
        def read():
            state = source.readers[name](dtype)
            check_state_dict(networks[name], state, str(source.files[name]))
            return state

        return read

    return write_native(Path(dst), source.config, {n: checked(n) for n in networks}, vocab_dir, dtype)
