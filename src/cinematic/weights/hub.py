"""Hugging Face hub ids: download only the files a layout needs, preferring the fp16 safetensors variant.

With no network (``HF_HUB_OFFLINE=1``, or none reachable) a repo already in the local cache is used as it is.
"""

from __future__ import annotations

import re
from pathlib import Path

from cinematic.errors import CinematicError

# Renamed organisations: the hub redirects old names online, but the offline cache is keyed by the name used.
ALIASES = {
    "damo-vilab/text-to-video-ms-1.7b": "ali-vilab/text-to-video-ms-1.7b",
    "damo-vilab/modelscope-damo-text-to-video-synthesis": "ali-vilab/modelscope-damo-text-to-video-synthesis",
}
# Where the CLIP vocabulary comes from when a ModelScope folder ships none (the same BPE as every CLIP model).
TOKENIZER_REPO = "ali-vilab/text-to-video-ms-1.7b"

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_DIFFUSERS_WEIGHTS = re.compile(r"^(unet|vae|text_encoder)/[^/]+\.(safetensors|bin)(\.index\.json)?$")


def is_hub_id(name: str) -> bool:
    return bool(_HUB_ID.fullmatch(name)) and not Path(name).exists()


def _kind(name: str) -> str:
    """``.fp16.safetensors``, ``.safetensors``, ``.fp16.bin`` or ``.bin``, for single files, shards and indexes."""
    base = name.removesuffix(".index.json")
    return (".fp16" if ".fp16" in base else "") + (".safetensors" if ".safetensors" in base else ".bin")


def _pick_weights(files: list[str]) -> list[str]:
    """Per diffusers component, the files of the best weights kind: fp16 safetensors first."""
    chosen = []
    for component in ("unet", "vae", "text_encoder"):
        candidates = [f for f in files if f.startswith(component + "/") and _DIFFUSERS_WEIGHTS.match(f)]
        for kind in (".fp16.safetensors", ".safetensors", ".fp16.bin", ".bin"):
            hits = [f for f in candidates if _kind(f) == kind]
            if hits:
                chosen += hits
                break
    return chosen


def allow_patterns(files: list[str]) -> list[str]:
    """The files of the repo that loading needs, given its file list."""
    if "model.json" in files:
        return ["model.json", "*.safetensors", "tokenizer/*"]
    if "model_index.json" in files:
        configs = [
            f
            for f in files
            if f.endswith(".json") and f.split("/")[0] in {"unet", "vae", "text_encoder", "scheduler", "tokenizer"}
        ]
        return ["model_index.json", "tokenizer/*", *configs, *_pick_weights(files)]
    if "configuration.json" in files:
        return ["configuration.json", "*.pth", "*.bin", "tokenizer/*", "vocab.json", "merges.txt"]
    raise CinematicError("the hub repo has no model.json, model_index.json or configuration.json: no known layout")


def download(repo_id: str) -> Path:
    from huggingface_hub import list_repo_files, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    repo_id = ALIASES.get(repo_id, repo_id)
    try:
        files = list_repo_files(repo_id)
    except (OfflineModeIsEnabled, LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError):
        files = None  # no network: fall back to the cache below
    try:
        if files is None:
            return Path(snapshot_download(repo_id, local_files_only=True))
        return Path(snapshot_download(repo_id, allow_patterns=allow_patterns(files)))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, OSError, ValueError) as e:
        raise CinematicError(
            f"hub id {repo_id}: not in the local Hugging Face cache and the hub cannot be reached ({type(e).__name__})"
        ) from None
    except HfHubHTTPError as e:
        raise CinematicError(f"hub id {repo_id}: download failed: {str(e).splitlines()[0]}") from None


def download_tokenizer(repo_id: str = TOKENIZER_REPO) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        paths = [Path(hf_hub_download(repo_id, f"tokenizer/{name}")) for name in ("vocab.json", "merges.txt")]
    except Exception as e:  # any hub failure means the same thing here: no vocabulary to be had
        raise CinematicError(
            f"no tokenizer: the model folder has no vocab.json/merges.txt, no --tokenizer was given, and "
            f"{repo_id} is not in the Hugging Face cache nor reachable ({type(e).__name__})"
        ) from None
    return paths[0].parent


def download_lora(repo_id: str, subfolder: str = "") -> Path:
    """The folder of a LoRA hub repo (``subfolder`` inside it, when given): the copy in the local Hugging Face cache
    when there is one, else downloaded (only the adapter files: ``.pt``, ``.safetensors`` and their JSON)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    inside = f"{subfolder.strip('/')}/" if subfolder.strip("/") else ""
    patterns = [f"{inside}*.pt", f"{inside}*.safetensors", f"{inside}*.json"]
    if not inside:  # a repo of several adapters (yhzhai/mcm): their folders, to list them
        patterns += ["*/*.safetensors", "*/*.json"]
    try:
        folder = Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, OSError, ValueError):
        try:
            folder = Path(snapshot_download(repo_id, allow_patterns=patterns))
        except (LocalEntryNotFoundError, OfflineModeIsEnabled, OSError, ValueError) as e:
            raise CinematicError(
                f"LoRA hub id {repo_id}: not in the local Hugging Face cache and the hub cannot be reached "
                f"({type(e).__name__})"
            ) from None
        except HfHubHTTPError as e:
            raise CinematicError(f"LoRA hub id {repo_id}: download failed: {str(e).splitlines()[0]}") from None
    target = folder / inside
    if not target.is_dir():
        raise CinematicError(f"LoRA hub id {repo_id} has no folder {subfolder!r}")
    return target
