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

    class VideoCreate(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)

        prompt: Annotated[str, Field(**text, description="What the video shows, in English.")]
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

        @field_validator("prompt")
        @classmethod
        def _not_blank(cls, value: str) -> str:
            if not value.strip():
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
    prompt: str
    negative_prompt: str | None
    size: str
    frames: int
    fps: float
    seconds: str = Field(description="The clip's duration, frames / fps.")
    steps: int
    guidance: float
    seed: int
    sampler: str


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
