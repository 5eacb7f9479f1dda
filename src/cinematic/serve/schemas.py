"""The API's request and response bodies, shaped after OpenAI's Videos API so its clients and habits carry over.

The request model is built per server (:func:`request_model`) because its limits are settings and the model name
is the served one: the OpenAPI schema at ``/docs`` then states the limits this server enforces, and a breach is a
422 that names the field. This module does not use ``from __future__ import annotations``: pydantic reads the
annotations of the class built inside :func:`request_model`, and they refer to that function's locals.
"""

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator

from cinematic.serve.settings import Limits
from cinematic.serve.store import STATUSES
from cinematic.settings import SPECS, ModelFacts, kind, spec

SIZE_PATTERN = r"^[1-9][0-9]{0,4}x[1-9][0-9]{0,4}$"
LORA_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
MAX_LORAS = 8
TYPES = {bool: bool, int: int, float: float, str: str}


class LoraRef(BaseModel):
    """One adapter of the server's LoRA folder, by name, and its strength."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: Annotated[str, Field(pattern=LORA_NAME, description="An adapter the server offers (see /healthz).")]
    scale: Annotated[float, Field(ge=-4, le=4, allow_inf_nan=False, description="Strength, default 1.")] = 1.0


def base64_length(size: int) -> int:
    """The most characters of ``size`` bytes in base64, with room for a ``data:...;base64,`` prefix."""
    return 4 * ((size + 2) // 3) + 100


def parse_size(text: str) -> tuple[int, int]:
    width, height = text.split("x")
    return int(width), int(height)


def setting_bounds(limits: Limits, model: ModelFacts) -> dict[str, tuple[float | None, float | None]]:
    """``(low, high)`` of each numeric setting on this server: the declared bounds, narrowed by the model and by the
    server's limits."""
    caps = {
        "num_frames": limits.max_frames, "window": limits.max_frames, "window_stride": limits.max_frames,
        "height": limits.max_size, "width": limits.max_size, "num_inference_steps": limits.max_steps,
    }  # fmt: skip
    bounds = {name: (spec(name).low, spec(name).high) for name in SPECS if kind(name) in (int, float)}
    for name, low, high in model.bounds():
        bounds[name] = (low, high)
    for name, cap in caps.items():
        low, high = bounds[name]
        bounds[name] = (low, cap if high is None else min(high, cap))
    return bounds


def _setting_field(name: str, bounds: dict, limits: Limits, old: bool = False) -> tuple[Any, Any]:
    """The request field of one setting: its type, bounds and help from the table (``old``: under a deprecated
    name)."""
    s, k = spec(name), kind(name)
    annotation: Any = Literal[s.choices] if s.choices else TYPES[k]
    extra: dict[str, Any] = {}
    if name in bounds:
        extra["ge"], extra["le"] = bounds[name]
        extra["multiple_of"] = s.multiple_of
    if k is float:
        extra["allow_inf_nan"] = False
    if k is str and not s.choices:
        cap = limits.max_prompt * (4 if name == "prompt_schedule" else 1)
        extra["max_length"] = min(cap, s.max_length) if s.max_length else cap
        extra["min_length"] = 1 if s.nonblank else 0
    if old:
        return annotation | None, Field(default=None, description=f"Deprecated: use {name}.", deprecated=True, **extra)
    return annotation | None, Field(default=None, description=s.help, **extra)


def request_model(limits: Limits, model: str, facts: ModelFacts) -> type[BaseModel]:
    """The body of ``POST /v1/videos`` for one server: every setting of :class:`cinematic.settings.Settings` under
    its name, within this server's limits; the deprecated old names; OpenAI's ``size``; the uploads and adapters."""
    bounds = setting_bounds(limits, facts)
    fields: dict[str, Any] = {name: _setting_field(name, bounds, limits) for name in SPECS}
    for name, s in SPECS.items():
        for old in s.aliases:
            fields[old] = _setting_field(name, bounds, limits, old=True)
    upload = {"min_length": 1, "max_length": base64_length(limits.max_upload)}
    megabytes = f"{limits.max_upload / 2**20:g} MiB"
    fields.update(
        model=(Literal[(model,)] | None, Field(default=None, description="The served model; the only one accepted.")),
        size=(str | None, Field(default=None, pattern=SIZE_PATTERN, description="OpenAI's WIDTHxHEIGHT, in place "
                                "of width and height.")),
        init_video=(str | None, Field(default=None, **upload, description="Video-to-video: the clip to restyle, as "
                                      f"base64 (a data: URL too), at most {megabytes}.")),
        init_image=(str | None, Field(default=None, **upload, description="Animate this picture (base64, at most "
                                      f"{megabytes}): it stays frame 0.")),
        loras=(list[LoraRef] | None, Field(default=None, max_length=MAX_LORAS, description="LoRA adapters of the "
                                           "server's folder, applied for this job.")),
    )  # fmt: skip
    return create_model(
        "VideoCreate",
        __config__=ConfigDict(extra="forbid", strict=True),
        __validators__={"_not_blank": field_validator("prompt")(_not_blank)},
        **fields,
    )


def _not_blank(cls: Any, value: str | None) -> str | None:
    if value is not None and not value.strip():
        raise ValueError("the prompt is blank; describe the video to generate")
    return value


class VideoError(BaseModel):
    code: str
    message: str


class _Job(BaseModel):
    """A job and, once completed, its video (``GET /v1/videos/{id}/content``)."""

    id: str
    object: Literal["video"] = "video"
    status: Literal[STATUSES]
    progress: Annotated[int, Field(ge=0, le=100)]
    created_at: int = Field(description="Unix seconds.")
    started_at: int | None = Field(description="When the last run started; null while queued.")
    completed_at: int | None = Field(description="When it completed, failed or was cancelled.")
    error: VideoError | None
    model: str
    init_video: bool = Field(default=False, description="Whether the job restyles an uploaded clip.")
    init_image: bool = Field(default=False, description="Whether the job animates an uploaded picture.")
    loras: list[LoraRef] = Field(default_factory=list)
    size: str = Field(description="OpenAI's WIDTHxHEIGHT.")
    seconds: str = Field(description="The clip's duration, num_frames / fps (OpenAI's).")


VideoJob = create_model(
    "VideoJob",
    __base__=_Job,
    **{name: (TYPES[kind(name)] | None, Field(default=None, description=spec(name).help)) for name in SPECS},
    **{
        old: (TYPES[kind(name)] | None, Field(default=None, description=f"Deprecated: use {name}.", deprecated=True))
        for name in SPECS
        for old in spec(name).aliases
    },
)


class VideoList(BaseModel):
    """A page of jobs, newest first; pass ``last_id`` as ``after`` for the next page while ``has_more``."""

    object: Literal["list"] = "list"
    data: list[VideoJob]
    first_id: str | None
    last_id: str | None
    has_more: bool


class VideoDeleted(BaseModel):
    id: str
    object: Literal["video.deleted"] = "video.deleted"
    deleted: Literal[True] = True


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = Field(description="The request field at fault, when one is.")
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok", "unhealthy"] = Field(
        "ok", description="unhealthy (with HTTP 503): a worker is dead or stuck."
    )
    model: str
    workers: list[dict[str, Any]]
    queued: int
    auth: bool = Field(description="Whether /v1 needs Authorization: Bearer <key>.")
    defaults: dict[str, Any]
    limits: dict[str, Any]
    bounds: dict[str, Any] = Field(default_factory=dict, description="[low, high] of each numeric setting here.")
    samplers: list[str]
    loras: list[str] = Field(default_factory=list, description="The LoRA adapters requests may name.")
