"""``--cache-latents DIR``: the frozen VAE's posterior moments (and the frozen text encoder's features) of every
clip a run trains on, computed once and read back by every later step, epoch and run.

What is cached is what the loss would compute before its first random draw: the posterior's mean and log-variance
of each clip (not a sample, so each step still draws its own posterior sample, from the same stream as without the
cache) and, when the text encoder does not train, the features of its caption and of "" (for dropped captions).
The loss with the cache is therefore the loss without it.

``DIR/<key>/`` holds one ``<index>.safetensors`` per dataset item and ``empty.safetensors``; ``<key>`` is a hash of
everything the entries depend on (the VAE's and, for features, the text encoder's config and weights and the
tokenizer; the data: the captions file and each video's size and time of change, or the shapes generator's seed and
sizes; the clip size), so a changed model or dataset gets a fresh folder instead of stale latents. The items a run
will use are found from its batch plan before the first step and the missing ones are split over the ranks (rank
``r`` computes every ``r``-th); each file is written atomically, so a run killed while filling the cache leaves
only whole entries.

With the cache, item ``i`` is always the dataset's fixed clip ``dataset[i]`` (a video file's first frames, not a
random start): a cached clip must be the same clip every time it is used.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from cinematic.errors import CinematicError
from cinematic.models.components import Model

if TYPE_CHECKING:
    from cinematic.data.dataset import VideoDataset
    from cinematic.train.batches import BatchPlan
    from cinematic.train.config import TrainConfig
    from cinematic.train.distributed import World

EMPTY = "empty"


class LatentCache:
    """The entries of one (model, data, clip size) key in ``folder``."""

    def __init__(self, folder: Path, key: str, text: bool):
        self.folder, self.text = Path(folder) / key, text

    def path(self, name: int | str) -> Path:
        return self.folder / (f"{name:08d}.safetensors" if isinstance(name, int) else f"{name}.safetensors")

    def missing(self, indices: list[int]) -> list[int]:
        return [i for i in indices if not self.path(i).is_file()]

    def write(self, name: int | str, tensors: dict[str, torch.Tensor], caption: str = "") -> None:
        from safetensors.torch import save_file

        target = self.path(name)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}
        save_file(tensors, str(tmp), metadata={"caption": caption})
        os.replace(tmp, target)

    def read(self, name: int | str) -> tuple[dict[str, torch.Tensor], str]:
        """The entry's tensors and caption."""
        from safetensors import safe_open

        try:
            with safe_open(str(self.path(name)), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, (f.metadata() or {})["caption"]
        except Exception as e:  # a damaged entry: say which, in one line
            raise CinematicError(
                f"cannot read the cached latents {self.path(name)}: {str(e).splitlines()[0]}"
            ) from None


class CachedClips:
    """A dataset whose item ``i`` is the cached ``{"mean", "logvar"}`` (each ``[F,4,h,w]``) of clip ``i``, its
    caption, and, with text features, ``{"context", "empty_context"}``."""

    def __init__(self, cache: LatentCache, size: int):
        self.cache, self.size = cache, size
        self.empty = cache.read(EMPTY)[0]["context"] if cache.text else None

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, Any]:
        entry, caption = self.cache.read(index)
        item = {"mean": entry["mean"], "logvar": entry["logvar"], "caption": caption}
        if self.empty is not None:
            item.update(context=entry["context"], empty_context=self.empty)
        return item


def cached_dataset(
    config: TrainConfig, model: Model, dataset: VideoDataset, clip: tuple[int, int, int], world: World, plan: BatchPlan
) -> CachedClips:
    """Fill the cache with the items of ``plan`` (the whole run's, all ranks') and return the dataset that reads
    it; every rank returns once all of them have written their share."""
    text = config.lora is not None or "text" not in config.trained_parts()  # a LoRA run adapts the UNet alone
    cache = LatentCache(Path(config.cache_latents).expanduser(), cache_key(model, dataset, clip, text), text)
    if world.is_main:
        try:
            cache.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CinematicError(f"--cache-latents: cannot create {cache.folder}: {e.strerror or e}") from None
    world.barrier()
    needed = sorted({index for keys in plan for index, _ in keys})
    missing = cache.missing(needed)
    if world.is_main and config.progress:
        print(f"cached latents in {cache.folder}: {len(needed) - len(missing)} of the run's {len(needed)} clips "
              f"found, {len(missing)} to compute", file=sys.stderr)  # fmt: skip
    with torch.no_grad():
        fill(cache, model, dataset, missing[world.rank :: world.size], config.batch_size)
        if world.is_main and text and not cache.path(EMPTY).is_file():
            cache.write(EMPTY, {"context": _features(model, [""])[0]})
    world.barrier()
    return CachedClips(cache, len(dataset))


def fill(cache: LatentCache, model: Model, dataset: VideoDataset, indices: list[int], batch_size: int) -> None:
    """Compute and write the entries of ``indices`` (the clips ``dataset[i]``), ``batch_size`` at a time."""
    device = model.vae.quant_conv.weight.device
    for first in range(0, len(indices), batch_size):
        chunk = indices[first : first + batch_size]
        items = [dataset[i] for i in chunk]
        video = torch.stack([item["video"] for item in items]).to(device)
        mean, logvar = model.vae.encode_moments(video)  # [(B F),4,h,w]
        mean, logvar = mean.unflatten(0, (len(chunk), -1)), logvar.unflatten(0, (len(chunk), -1))
        contexts = _features(model, [item["caption"] for item in items]) if cache.text else None
        for row, index in enumerate(chunk):
            entry = {"mean": mean[row], "logvar": logvar[row]}
            if contexts is not None:
                entry["context"] = contexts[row]
            cache.write(index, entry, items[row]["caption"])


def _features(model: Model, captions: list[str]) -> torch.Tensor:
    device = next(model.text_encoder.parameters()).device
    return model.text_encoder(model.tokenizer(captions).to(device)).float()


def cache_key(model: Model, dataset: VideoDataset, clip: tuple[int, int, int], text: bool) -> str:
    """A short hash of everything a cache entry depends on."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"vae": dataclasses.asdict(model.config.vae), "clip": clip, "text": text}).encode())
    _hash_weights(digest, model.vae)
    if text:
        digest.update(json.dumps(dataclasses.asdict(model.config.text_encoder)).encode())
        digest.update(json.dumps(model.tokenizer.vocab, sort_keys=True).encode())
        _hash_weights(digest, model.text_encoder)
    digest.update(describe_data(dataset).encode())
    return digest.hexdigest()[:16]


def _hash_weights(digest: Any, network: nn.Module) -> None:
    for name, tensor in sorted(network.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def describe_data(dataset: VideoDataset) -> str:
    """What the clips of ``dataset`` are made from, as text: for video files, each file's path, caption, size and
    time of change; for the shapes generator, its settings; for any other dataset, its type, length and the
    pixels of its first clip."""
    from cinematic.data.files import VideoFiles
    from cinematic.data.shapes import ShapesDataset

    if isinstance(dataset, VideoFiles):
        files = [
            (str(c.path.resolve()), c.caption, c.path.stat().st_size, c.path.stat().st_mtime_ns) for c in dataset.clips
        ]
        return json.dumps({"files": files, "clip": [dataset.frames, dataset.height, dataset.width, dataset.stride]})
    if isinstance(dataset, ShapesDataset):
        settings = [list(dataset.captions), dataset.size, dataset.frames, dataset.seed, dataset.length]
        return json.dumps({"shapes": settings})
    first = dataset[0]["video"].float().contiguous().reshape(-1).view(torch.uint8).numpy()
    return f"{type(dataset).__module__}.{type(dataset).__qualname__}:{len(dataset)}:{hashlib.sha256(first).hexdigest()}"
