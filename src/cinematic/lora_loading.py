"""Loading LoRA adapter files at inference: load them onto a UNet (merged or not), take them off again, parse
``path[:scale]``.

The adapter layers are in ``models/lora_adapters.py``, the file layouts in ``weights/lora_formats.py``; this is the
glue that :class:`cinematic.pipeline.Pipeline` and the CLI call. Every adapter loaded here is a change recorded by
:mod:`cinematic.models.modifications`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from torch import nn

from cinematic.errors import CinematicError
from cinematic.models import lora_adapters, modifications
from cinematic.models.unet3d import add_guidance_embedding
from cinematic.weights.lora_formats import PEFT_CONFIG, adapter_file, few_step_info, read_adapter
from cinematic.weights.turbo_lora import GUIDANCE_WIDTH, convert_turbo_lora, read_turbo_lora, turbo_file
from cinematic.weights.turbo_lora import SUFFIXES as TURBO_SUFFIXES

LoRASpecs = Sequence[tuple[str | Path, float]]

T2V_TURBO, MCM, DISTILLED, OTHER = "t2v-turbo", "mcm", "distilled", "lora"  # DISTILLED: by cinematic distill
# The sampler settings each few-step student was distilled for (docs/few-step.md), set as the model's defaults when
# one is loaded: T2V-Turbo-MS (app_ms.py: 4 steps, guidance 7.5 fed to its embedding, the LCM boundary scalings
# at timestep scaling 10) and MCM (demo.py: guidance 1, i.e. one conditional pass, timestep scaling 4).
FEW_STEP_DEFAULTS = {
    T2V_TURBO: {"sampler": "lcm", "num_inference_steps": 4, "guidance_scale": 7.5, "timestep_scaling": 10.0},
    MCM: {"sampler": "lcm", "num_inference_steps": 4, "guidance_scale": 1.0, "timestep_scaling": 4.0},
}
# LoRAs shipped in the package (src/cinematic/assets/<name>), loadable by name: the 4-step student of the bundled
# shapes model (recipes/distill_shapes.py).
BUNDLED_LORAS = ("shapes-turbo",)
MCM_FOLDER_PREFIX = "modelscopet2v"  # the sub-folders of yhzhai/mcm: modelscopet2v-webvid, -laion, ...


def parse_spec(spec: str) -> tuple[str, float]:
    """``path`` or ``path:scale`` (the scale a number; a path may itself hold colons) -> ``(path, scale)``."""
    path, _, tail = spec.rpartition(":")
    if path:
        try:
            return path, lora_adapters.check_scale(float(tail))
        except ValueError:
            if not Path(spec).expanduser().exists():
                raise CinematicError(f"--lora {spec!r}: the scale after ':' must be a number, not {tail!r}") from None
    if not spec:
        raise CinematicError("--lora needs a path, optionally followed by :scale")
    return spec, 1.0


def lora_file(spec: str | Path) -> tuple[Path, str]:
    """The adapter file that ``spec`` names, and its kind (:data:`T2V_TURBO`, :data:`MCM` or :data:`OTHER`).

    ``spec``: a file, a folder holding one adapter, or a hub id ``owner/name`` or ``owner/name/sub/folder`` (taken
    from the local Hugging Face cache, else downloaded). A T2V-Turbo list is a ``.pt`` file (``unet_lora.pt``); an
    MCM LoRA is a PEFT folder (``adapter_config.json``) named ``modelscopet2v-*``, as in ``yhzhai/mcm``.
    """
    path = _local(spec)
    turbo = turbo_file(path)
    if turbo is not None:
        if not turbo.is_file():
            raise CinematicError(f"missing LoRA file: {turbo}")
        return turbo, T2V_TURBO
    if path.is_dir() and not any(path.glob("*.safetensors")):
        inside = sorted(p.name for p in path.iterdir() if p.is_dir() and any(p.glob("*.safetensors")))
        if inside:
            raise CinematicError(f"{spec} holds several LoRAs; name one: {', '.join(f'{spec}/{p}' for p in inside)}")
    file = adapter_file(path)
    mcm = (file.parent / PEFT_CONFIG).is_file() and file.parent.name.startswith(MCM_FOLDER_PREFIX)
    if mcm:
        return file, MCM
    return file, DISTILLED if few_step_info(file) != (None, None) else OTHER


def _local(spec: str | Path) -> Path:
    """A local path for ``spec``: itself when it exists, else a bundled LoRA's folder (``shapes-turbo``), else the
    folder of a hub id."""
    path = Path(spec).expanduser()
    if path.exists():
        return path
    from cinematic.weights import BUNDLED_DIR

    if isinstance(spec, str) and spec in BUNDLED_LORAS:
        return BUNDLED_DIR / spec
    from cinematic.weights import hub

    parts = str(spec).split("/")
    a_path = str(spec).startswith((".", "/", "~")) or path.suffix in (".safetensors", *TURBO_SUFFIXES)
    if len(parts) >= 2 and hub.is_hub_id("/".join(parts[:2])) and not a_path:
        return hub.download_lora("/".join(parts[:2]), "/".join(parts[2:]))
    raise CinematicError(f"missing LoRA file: {path}")


def few_step_defaults(spec: str | Path) -> dict[str, object] | None:
    """The sampler settings that the few-step student at ``spec`` was distilled for, or None for other LoRAs: the
    published students' (:data:`FEW_STEP_DEFAULTS`), or those ``cinematic distill`` wrote into its ``lora.json``."""
    file, kind = lora_file(spec)
    if kind == DISTILLED:
        return few_step_info(file)[0]
    return FEW_STEP_DEFAULTS.get(kind)


def load_lora(unet: nn.Module, path: str | Path, scale: float = 1.0, merge: bool = False) -> str:
    """Attach the adapter at ``path`` (a file, a folder or a hub id, in any format :func:`lora_file` knows) to
    ``unet`` with strength ``scale``; returns the name it is loaded under. A T2V-Turbo LoRA on a UNet without a
    guidance embedding adds one (:func:`cinematic.models.unet3d.add_guidance_embedding`), taken off with the adapter.

    Everything is checked (file, keys, shapes, scale) before the UNet changes, so a bad adapter leaves it as it was.
    """
    scale = lora_adapters.check_scale(scale)
    file, kind = lora_file(path)
    taken = set(lora_adapters.adapter_names(unet))
    name = next(f"lora{i}" for i in range(len(taken) + 1) if f"lora{i}" not in taken)
    if kind == T2V_TURBO:
        tensors = read_turbo_lora(file)
        embedding = None
        if unet.config.time_cond_proj_dim is None:
            embedding = add_guidance_embedding(unet, GUIDANCE_WIDTH, name)
        try:
            state = convert_turbo_lora(tensors, unet, str(file))
        except CinematicError:
            if embedding is not None:
                modifications.undo(unet, embedding)
            raise
    else:
        state, _ = read_adapter(file)
        width = few_step_info(file)[1] if kind == DISTILLED else None
        if width is not None and unet.config.time_cond_proj_dim is None:
            add_guidance_embedding(unet, width, name)  # zero, as the student was distilled from (cinematic distill)
    try:
        lora_adapters.load_adapter(unet, state, name, scale, what=str(file))
        if merge:
            lora_adapters.merge(unet, name)
    except CinematicError:
        _remove(unet, name)
        raise
    return name


def _remove(unet: nn.Module, name: str) -> None:
    """Take adapter ``name`` off, with the guidance embedding its loading added; nothing when neither is there."""
    if name in lora_adapters.adapter_names(unet):
        lora_adapters.remove(unet, name)
    for added in modifications.active(unet, "guidance_embedding"):
        if added.detail == name:
            modifications.undo(unet, added)


def unload_lora(unet: nn.Module, name: str | None = None) -> None:
    """Take adapter ``name`` (default: every adapter) off ``unet``; merged weights are restored exactly."""
    for each in [name] if name is not None else reversed(lora_adapters.adapter_names(unet)):
        if each not in lora_adapters.adapter_names(unet):
            lora_adapters.remove(unet, each)  # the error: no adapter of that name is loaded
        _remove(unet, each)


@contextmanager
def loras_applied(unet: nn.Module, loras: LoRASpecs | None, merge: bool = False) -> Iterator[list[str]]:
    """The adapters ``[(path, scale), ...]`` loaded for the duration of the block, then taken off again."""
    names: list[str] = []
    try:
        for path, scale in loras or ():
            names.append(load_lora(unet, path, scale, merge))
        yield names
    finally:
        for name in reversed(names):
            _remove(unet, name)
