"""The API's request and response bodies, shaped after OpenAI's Videos API so its clients and habits carry over.

The request model is built per server (:func:`request_model`) because its limits are settings and the model name
is the served one: the OpenAPI schema at ``/docs`` then states the limits this server enforces, and a breach is a
422 that names the field. This module does not use ``from __future__ import annotations``: pydantic reads the
annotations of the class built inside :func:`request_model`, and they refer to that function's locals.
"""

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from cinematic.serve.settings import Limits
from cinematic.serve.store import STATUSES

SIZE_PATTERN = r"^[1-9][0-9]{0,4}x[1-9][0-9]{0,4}$"
SIZE_MULTIPLE = 8
SEED_MAX = 2**32 - 1
DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 9.0
DEFAULT_SAMPLER = "ddim"


LORA_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
MAX_LORAS = 8


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


def request_model(
    limits: Limits, model: str, min_size: int, default_size: str, default_frames: int, samplers: tuple[str, ...]
) -> type[BaseModel]:
    """The body of ``POST /v1/videos`` for one server: its model name, its limits, its samplers."""
    ModelName = Literal[(model,)]  # noqa: N806 - a type
    Sampler = Literal[samplers]  # noqa: N806
    text = {"min_length": 1, "max_length": limits.max_prompt}
    upload = {"min_length": 1, "max_length": base64_length(limits.max_upload)}
    megabytes = f"{limits.max_upload / 2**20:g} MiB"

    class VideoCreate(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)

        prompt: Annotated[
            str | None, Field(**text, description="What the video shows, in English; required unless prompt_schedule.")
        ] = None
        negative_prompt: Annotated[str | None, Field(max_length=limits.max_prompt, description="What to avoid.")] = None
        model: Annotated[ModelName | None, Field(description="The served model; the only one accepted.")] = None
        frames: Annotated[int | None, Field(ge=1, le=limits.max_frames, description=f"Default {default_frames}.")] = (
            None
        )
        size: Annotated[
            str | None,
            Field(
                pattern=SIZE_PATTERN,
                description=f"WIDTHxHEIGHT, each a multiple of {SIZE_MULTIPLE} from {min_size} to "
                f"{limits.max_size}. Default {default_size}, the model's trained size.",
            ),
        ] = None
        steps: Annotated[int | None, Field(ge=1, le=limits.max_steps, description=f"Default {DEFAULT_STEPS}.")] = None
        guidance: Annotated[
            float | None,
            Field(
                ge=0, le=100, allow_inf_nan=False, description=f"Classifier-free guidance, default {DEFAULT_GUIDANCE}."
            ),
        ] = None
        seed: Annotated[int | None, Field(ge=0, le=SEED_MAX, description="Default: drawn, and returned.")] = None
        sampler: Annotated[Sampler | None, Field(description=f"Default {DEFAULT_SAMPLER}.")] = None
        prompt_schedule: Annotated[
            str | None,
            Field(
                min_length=1,
                max_length=4 * limits.max_prompt,
                description='Prompts over time, in place of prompt: "0: a red circle moving right | 32: a red circle '
                'moving left" (start frame: prompt).',
            ),
        ] = None
        window: Annotated[
            int | None,
            Field(
                ge=0,
                le=limits.max_frames,
                description="Clips longer than this run through the UNet in overlapping windows of this many frames; "
                f"0: the whole clip at once. Default {default_frames}, the model's trained length.",
            ),
        ] = None
        window_stride: Annotated[
            int | None, Field(ge=1, le=limits.max_frames, description="Frames between windows; default window / 2.")
        ] = None
        init_video: Annotated[
            str | None,
            Field(
                **upload,
                description=f"Video-to-video: the clip to restyle, as base64 (a data: URL too), at most {megabytes}. "
                "frames defaults to its frame count.",
            ),
        ] = None
        strength: Annotated[
            float | None,
            Field(ge=0, le=1, allow_inf_nan=False, description="With init_video: 0 keeps it, 1 ignores it; 0.6."),
        ] = None
        init_image: Annotated[
            str | None,
            Field(**upload, description=f"Animate this picture (base64, at most {megabytes}): it stays frame 0."),
        ] = None
        loop: Annotated[bool | None, Field(description="Pin the last frame to the first.")] = None
        freeu: Annotated[bool | None, Field(description="FreeU (b1=1.2, b2=1.4, s1=0.9, s2=0.2).")] = None
        freeinit: Annotated[int | None, Field(ge=0, le=10, description="FreeInit iterations; default 0.")] = None
        loras: Annotated[
            list[LoraRef] | None,
            Field(max_length=MAX_LORAS, description="LoRA adapters of the server's folder, applied for this job."),
        ] = None

        @field_validator("prompt")
        @classmethod
        def _not_blank(cls, value: str | None) -> str | None:
            if value is not None and not value.strip():
                raise ValueError("the prompt is blank; describe the video to generate")
            return value

        @field_validator("size")
        @classmethod
        def _size(cls, value: str | None) -> str | None:
            if value is None:
                return value
            sides = parse_size(value)
            if any(side % SIZE_MULTIPLE or not min_size <= side <= limits.max_size for side in sides):
                raise ValueError(
                    f"each side must be a multiple of {SIZE_MULTIPLE} from {min_size} to {limits.max_size}, "
                    f"not {value!r}"
                )
            return value

    return VideoCreate


class VideoError(BaseModel):
    code: str
    message: str


class VideoJob(BaseModel):
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
    prompt: str = Field(description='The prompt ("" when prompt_schedule is given).')
    negative_prompt: str | None
    size: str
    frames: int
    fps: float
    seconds: str = Field(description="The clip's duration, frames / fps.")
    steps: int
    guidance: float
    seed: int
    sampler: str
    prompt_schedule: str | None = None
    window: int | None = Field(default=None, description="Frames per UNet window, when the clip is longer.")
    init_video: bool = Field(default=False, description="Whether the job restyles an uploaded clip.")
    init_image: bool = Field(default=False, description="Whether the job animates an uploaded picture.")
    strength: float | None = None
    loop: bool = False
    freeu: bool = False
    freeinit: int = 0
    loras: list[LoraRef] = Field(default_factory=list)


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
    status: Literal["ok"] = "ok"
    model: str
    workers: list[dict[str, Any]]
    queued: int
    auth: bool = Field(description="Whether /v1 needs Authorization: Bearer <key>.")
    defaults: dict[str, Any]
    limits: dict[str, Any]
    samplers: list[str]
    loras: list[str] = Field(default_factory=list, description="The LoRA adapters requests may name.")
