"""LoRA adapter files: write ours in diffusers' PEFT-era layout, read that and diffusers' older UNet layouts.

What we write (``pytorch_lora_weights.safetensors``, the name diffusers' ``save_lora_weights`` uses), for each adapted
layer: ``unet.<layer>.lora_A.weight`` ``[rank, in]`` and ``unet.<layer>.lora_B.weight`` ``[out, rank]``, with the
rank and alpha in the safetensors metadata as diffusers writes them (``lora_adapter_metadata``: ``{"unet.r": ...,
"unet.lora_alpha": ...}``), and ``lora.json`` beside it with the same facts for people.

What we read, all mapped to a layer name of our UNet (= diffusers' module name) and a down / up pair, by this table:

==========================================================  =========================================
key ending                                                  meaning
==========================================================  =========================================
``<layer>.lora_A.weight`` / ``.lora_B.weight``              PEFT (diffusers >= 0.24 ``save_lora_weights``)
``<layer>.lora.down.weight`` / ``.lora.up.weight``          diffusers 0.2x ``LoRACompatibleLinear``
``<layer>.lora_linear_layer.down.weight`` / ``.up.weight``  diffusers 0.2x ``LoRALinearLayer``
``<attn>.processor.to_q_lora.down.weight`` / ``.up.weight`` diffusers' attention-processor LoRAs
                                                            (``to_q/k/v_lora``, ``to_out_lora`` = to_out.0)
``<layer>.alpha``                                           a per-layer alpha (network alphas)
==========================================================  =========================================

Keys may start with ``unet.`` or PEFT's ``base_model.model.``; alpha defaults to the rank (an update scale of 1).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from cinematic.errors import CinematicError
from cinematic.weights.files import read_safetensors, read_safetensors_header

FILE_NAME = "pytorch_lora_weights.safetensors"
INFO_NAME = "lora.json"
PEFT_CONFIG = "adapter_config.json"  # PEFT's save_pretrained writes it beside adapter_model.safetensors
METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
PREFIXES = ("unet.", "base_model.model.")
# key ending -> (what the key names before it, which matrix)
SUFFIXES = {
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    ".lora.down.weight": "down",
    ".lora.up.weight": "up",
    ".lora_linear_layer.down.weight": "down",
    ".lora_linear_layer.up.weight": "up",
    ".down.weight": "down",  # only after an attention processor's to_q_lora ... to_out_lora (checked below)
    ".up.weight": "up",
}
# diffusers' attention-processor LoRAs: the processor's attribute -> the attention's projection
PROCESSOR_LAYERS = {"to_q_lora": "to_q", "to_k_lora": "to_k", "to_v_lora": "to_v", "to_out_lora": "to_out.0"}

AdapterState = dict[str, tuple[torch.Tensor, torch.Tensor, float]]


def adapter_file(path: str | Path) -> Path:
    """The safetensors file of an adapter given as the file itself or a folder holding one."""
    path = Path(path).expanduser()
    if path.is_dir():
        if (path / FILE_NAME).is_file():
            return path / FILE_NAME
        found = sorted(path.glob("*.safetensors"))
        if len(found) != 1:
            raise CinematicError(f"{path} holds no {FILE_NAME} (and not exactly one other .safetensors file)")
        return found[0]
    if not path.is_file():
        raise CinematicError(f"missing LoRA file: {path}")
    return path


def read_metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file (empty when it has none), from its checked header."""
    return read_safetensors_header(path).metadata


def read_adapter(path: str | Path) -> tuple[AdapterState, dict[str, Any]]:
    """``({layer: (down, up, alpha)}, info)`` of an adapter file or folder, in float32, in any layout above."""
    file = adapter_file(path)
    state = read_safetensors(file, torch.float32)
    info = _info(file)
    if not state:
        raise CinematicError(f"{file} holds no tensors")
    return convert_adapter(state, info.get("alpha"), str(file)), info


FEW_STEP_KEY = "few_step"  # lora.json: the sampler settings a distilled student was made for
GUIDANCE_KEY = "guidance_embedding"  # lora.json: the width of the guidance embedding the student adds to the UNet
FEW_STEP_SETTINGS = ("sampler", "num_inference_steps", "guidance_scale", "timestep_scaling")


def few_step_info(file: Path) -> tuple[dict[str, Any] | None, int | None]:
    """``(sampler settings, guidance embedding width)`` of a student written by ``cinematic distill``, from the
    ``lora.json`` beside its file; ``(None, None)`` for any other adapter. Checked: known settings only, a positive
    integer width."""
    sidecar = file.parent / INFO_NAME
    if not sidecar.is_file():
        return None, None
    try:
        data = json.loads(sidecar.read_text())
    except (ValueError, OSError):
        raise CinematicError(f"{sidecar} is not valid JSON") from None
    if not isinstance(data, dict):
        return None, None
    settings, width = data.get(FEW_STEP_KEY), data.get(GUIDANCE_KEY)
    if settings is not None:
        if not isinstance(settings, dict) or set(settings) - set(FEW_STEP_SETTINGS):
            raise CinematicError(f"{sidecar}: {FEW_STEP_KEY} must be an object of {', '.join(FEW_STEP_SETTINGS)}")
    if width is not None and (isinstance(width, bool) or not isinstance(width, int) or not 1 <= width <= 4096):
        raise CinematicError(f"{sidecar}: {GUIDANCE_KEY} must be an integer from 1 to 4096, not {width!r:.40}")
    return settings, width


def _info(file: Path) -> dict[str, Any]:
    """Rank, alpha and targets from diffusers' metadata in the file, else from ``lora.json`` beside it."""
    packed = read_metadata(file).get(METADATA_KEY)
    if packed:
        try:
            meta = json.loads(packed)
        except ValueError:
            meta = {}
        if isinstance(meta, dict) and "unet.lora_alpha" in meta:
            return {"rank": meta.get("unet.r"), "alpha": meta["unet.lora_alpha"], "targets": meta.get("unet.targets")}
    if (file.parent / PEFT_CONFIG).is_file():
        return peft_info(file.parent / PEFT_CONFIG)
    sidecar = file.parent / INFO_NAME
    if sidecar.is_file():
        try:
            data = json.loads(sidecar.read_text())
        except ValueError:
            raise CinematicError(f"{sidecar} is not valid JSON") from None
        if isinstance(data, dict):
            return data
    return {}


def peft_info(path: Path) -> dict[str, Any]:
    """Rank and alpha from PEFT's ``adapter_config.json`` (``PeftModel.save_pretrained``; MCM's LoRAs). PEFT scales
    the update by ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with ``use_rslora``; per-layer patterns and DoRA
    change the update in ways this reader does not follow, so they are refused rather than loaded wrong."""
    try:
        config = json.loads(path.read_text())
    except (ValueError, OSError) as e:
        raise CinematicError(f"{path} is not valid JSON ({type(e).__name__})") from None
    if not isinstance(config, dict):
        raise CinematicError(f"{path} must hold a JSON object")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    for key, value in (("r", rank), ("lora_alpha", alpha)):
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise CinematicError(f"{path}: {key} must be a positive number, not {value!r:.40}")
    unsupported = [key for key in ("rank_pattern", "alpha_pattern", "use_dora") if config.get(key)]
    if unsupported:
        raise CinematicError(f"{path}: {', '.join(unsupported)} is not supported; allowed: one rank and alpha")
    if config.get("use_rslora"):
        alpha = alpha * rank**0.5  # alpha / sqrt(r) == (alpha sqrt(r)) / r
    return {"rank": rank, "alpha": float(alpha)}


def convert_adapter(state: dict[str, torch.Tensor], alpha: float | None, what: str) -> AdapterState:
    """File keys -> ``{layer: (down, up, alpha)}``; a key that fits no known layout is an error naming it."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    alphas: dict[str, float] = {}
    foreign = []
    for key, tensor in state.items():
        name = _strip_prefix(key)
        if name is None:
            foreign.append(key)
            continue
        if name.endswith(".alpha"):
            alphas[_layer_of_processor(name.removesuffix(".alpha"))] = float(tensor)
            continue
        suffix = next((s for s in SUFFIXES if name.endswith(s)), None)
        bare = suffix in (".down.weight", ".up.weight")
        if suffix is None or bare and name.removesuffix(suffix).rpartition(".")[2] not in PROCESSOR_LAYERS:
            foreign.append(key)
            continue
        layer = _layer_of_processor(name.removesuffix(suffix))
        pairs.setdefault(layer, {})[SUFFIXES[suffix]] = tensor
    if foreign:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        raise CinematicError(
            f"{what} is not a UNet LoRA this cinematic reads: unknown keys {', '.join(foreign[:3])}{more}"
        )
    incomplete = sorted(layer for layer, pair in pairs.items() if set(pair) != {"down", "up"})
    if incomplete:
        raise CinematicError(f"{what}: layer {incomplete[0]} has a down or an up matrix but not both")
    return {
        layer: (p["down"], p["up"], alphas.get(layer, alpha if alpha is not None else float(p["down"].shape[0])))
        for layer, p in pairs.items()
    }


def _strip_prefix(key: str) -> str | None:
    """The key without ``unet.`` or ``base_model.model.``; None for another network's keys (text encoder)."""
    if key.startswith(("text_encoder", "te_", "lora_te")):
        return None
    for prefix in PREFIXES:
        key = key.removeprefix(prefix)
    return key


def _layer_of_processor(name: str) -> str:
    """``<attn>.processor.to_q_lora`` (or without ``.processor``) -> ``<attn>.to_q``; other names unchanged."""
    head, _, last = name.rpartition(".")
    if last in PROCESSOR_LAYERS:
        return f"{head.removesuffix('.processor')}.{PROCESSOR_LAYERS[last]}"
    return name


def peft_state(state: AdapterState) -> dict[str, torch.Tensor]:
    """Our adapter as the keys diffusers' ``save_lora_weights`` writes for a PEFT LoRA."""
    out = {}
    for layer, (down, up, _) in state.items():
        out[f"unet.{layer}.lora_A.weight"] = down.detach().contiguous().clone()
        out[f"unet.{layer}.lora_B.weight"] = up.detach().contiguous().clone()
    return out


def write_adapter(
    folder: Path,
    state: AdapterState,
    rank: int,
    alpha: float,
    targets: str,
    dtype: torch.dtype,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``folder/pytorch_lora_weights.safetensors`` and ``folder/lora.json``; returns the safetensors path.

    A layer whose alpha is not ``alpha`` (its rank was capped at its width) gets an ``unet.<layer>.alpha`` key, the
    per-layer alpha diffusers reads as network alphas. ``extra`` goes into ``lora.json`` beside rank and alpha (a
    distilled student's sampler settings and guidance embedding, see :func:`few_step_info`)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.to(dtype) for k, v in peft_state(state).items()}
    for layer, (_, _, layer_alpha) in state.items():
        if layer_alpha != alpha:
            tensors[f"unet.{layer}.alpha"] = torch.tensor(float(layer_alpha))
    layers = sorted({layer.rpartition(".")[2] if not layer.endswith("to_out.0") else "to_out.0" for layer in state})
    meta = {"unet.r": rank, "unet.lora_alpha": alpha, "unet.target_modules": layers, "unet.targets": targets}
    metadata = {"format": "pt", METADATA_KEY: json.dumps(meta, indent=2, sort_keys=True)}
    save_file(tensors, str(folder / FILE_NAME), metadata=metadata)
    info = {"rank": rank, "alpha": alpha, "targets": targets, "layers": len(state), "file": FILE_NAME, **(extra or {})}
    (folder / INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")
    return folder / FILE_NAME
