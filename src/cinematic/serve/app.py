"""The HTTP API and the web page: ``create_app(settings)`` returns the FastAPI application that uvicorn serves.

Endpoints follow OpenAI's Videos API (``/v1/videos``...), errors its ``{"error": {message, type, param, code}}``
body. Handlers are plain functions (FastAPI runs them on its thread pool): each is a few SQLite reads or one short
transaction, and generation happens on the workers' threads, never in a request. This module does not use
``from __future__ import annotations``: FastAPI reads the handlers' annotations, and the request body's class is
built at run time (see ``schemas.request_model``).
"""

import math
import threading
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Query
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from cinematic import __version__
from cinematic.errors import CinematicError
from cinematic.serve import metrics
from cinematic.serve.errors import KEY_REQUIRED, ApiError, add_error_handlers, documented
from cinematic.serve.files import MEDIA_TYPES
from cinematic.serve.gate import Gate, authorized
from cinematic.serve.schemas import (
    Health,
    VideoDeleted,
    VideoJob,
    VideoList,
    parse_size,
    request_model,
    setting_bounds,
)
from cinematic.serve.service import ModelInfo, Service
from cinematic.serve.settings import Limits, Settings
from cinematic.serve.store import ID_PATTERN, Job, Params, QueueFull
from cinematic.settings import ALIASES, SIZE_MULTIPLE, SPECS, ModelFacts, SettingError, canonical, with_old_names
from cinematic.settings import Settings as VideoSettings

STATIC = Path(__file__).parent / "static"
DESCRIPTION = """Text to video as a job queue. `POST /v1/videos` queues a job and returns it at once; poll
`GET /v1/videos/{id}` until `status` is `completed`, then download `GET /v1/videos/{id}/content`
(mp4, or `?variant=webm|gif`). Jobs survive restarts: one that was running starts again with the same seed."""


def create_app(settings: Settings, service: Service | None = None) -> FastAPI:
    """The application; opens (or takes) the :class:`Service`, and starts its workers when the server starts."""
    service = service or Service(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.start()
        try:
            yield
        finally:
            await run_in_threadpool(service.close)

    app = FastAPI(title="cinematic", version=__version__, description=DESCRIPTION, lifespan=lifespan)
    app.state.service = service
    app.add_middleware(Gate, api_key=settings.api_key, max_body=settings.body_limit)
    add_error_handlers(app, service.scrub)
    app.include_router(_api(settings, service))
    _add_server_routes(app, settings, service)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _authorizer(settings: Settings) -> Any:
    """The key check as a dependency, so that the schema declares it; ``gate.Gate`` has already made it, before
    the body was read."""
    bearer = HTTPBearer(auto_error=False, description="Only when the server was started with an API key.")
    key = settings.api_key.encode() if settings.api_key else None

    def authorize(request: Request, _: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
        if key is not None and not authorized(request.headers.get("authorization"), key):
            raise ApiError(401, KEY_REQUIRED, "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    return authorize


def _api(settings: Settings, service: Service) -> APIRouter:
    model = service.model
    VideoCreate = request_model(settings.limits, model.name, model.facts)  # noqa: N806 - a class
    router = APIRouter(prefix="/v1", dependencies=[Depends(_authorizer(settings))], tags=["videos"])

    @router.post(
        "/videos", response_model=VideoJob, responses=documented(401, 413, 422, 429, 503), summary="Queue a video"
    )
    def create_video(body: VideoCreate) -> dict[str, Any]:  # type: ignore[valid-type]
        params = _params(body, model, service, settings.limits)
        try:
            job = service.submit(params)
        except QueueFull:
            service.inputs.remove(params.init_video, params.init_image)
            wait = max(1, math.ceil(service.generation.mean() or 10))
            raise ApiError(
                429,
                f"the queue is full ({settings.max_queue} jobs waiting); retry later",
                "queue_full",
                headers={"Retry-After": str(wait)},
            ) from None
        except BaseException:
            service.inputs.remove(params.init_video, params.init_image)  # nothing was queued: keep no upload
            raise
        return _view(service, job)

    @router.get(
        "/videos", response_model=VideoList, responses=documented(401, 422), summary="List videos, newest first"
    )
    def list_videos(
        limit: Annotated[int, Query(ge=1, le=100, description="Jobs per page.")] = 20,
        after: Annotated[str | None, Query(max_length=64, description="The last id of the previous page.")] = None,
    ) -> dict[str, Any]:
        try:
            jobs, has_more = service.store.page(limit, after)
        except KeyError:
            raise ApiError(422, f"after: no video {after!r} to continue from", "invalid_value", param="after") from None
        data = [_view(service, job) for job in jobs]
        first, last = (jobs[0].id, jobs[-1].id) if jobs else (None, None)
        return {"data": data, "first_id": first, "last_id": last, "has_more": has_more}

    @router.get(
        "/videos/{video_id}", response_model=VideoJob, responses=documented(401, 404), summary="Get a video job"
    )
    def get_video(video_id: str) -> dict[str, Any]:
        return _view(service, _find(service, video_id))

    @router.get(
        "/videos/{video_id}/content",
        response_class=FileResponse,
        responses={
            200: {"content": {media: {} for media in MEDIA_TYPES.values()}, "description": "The video file."},
            206: {"description": "Part of the file, for a Range request."},
            **documented(401, 404, 409, 422),
        },
        summary="Download the video (Range requests supported)",
    )
    def video_content(
        video_id: str,
        variant: Annotated[Literal["mp4", "webm", "gif"], Query(description="File format; mp4 by default.")] = "mp4",
    ) -> Response:
        job = _find(service, video_id)
        if job.status != "completed":
            raise ApiError(409, f"{job.id} is {job.status}; its content exists once it is completed", "not_ready")
        path = service.content(job.id, variant)
        if path is None:
            raise ApiError(404, f"no video {video_id!r}", "not_found", param="video_id")
        return FileResponse(
            path, media_type=MEDIA_TYPES[variant], filename=f"{job.id}.{variant}", content_disposition_type="inline"
        )

    @router.delete(
        "/videos/{video_id}",
        response_model=VideoJob | VideoDeleted,
        responses=documented(401, 404, 409, 503),
        summary="Cancel a queued or running video, or delete a finished one with its files",
    )
    def delete_video(video_id: str) -> dict[str, Any]:
        if ID_PATTERN.fullmatch(video_id) and service.finish_delete(video_id):  # a DELETE cut short by a fault
            return {"id": video_id, "object": "video.deleted", "deleted": True}
        job = _find(service, video_id)
        if job.status in ("queued", "in_progress"):
            if service.cancel(job.id):
                return _view(service, _find(service, job.id))
            # It finished between the read and the cancel: deleting it now would surprise the caller.
            raise ApiError(409, f"{job.id} finished before it could be cancelled; delete it again", "conflict")
        if not service.delete(job):
            raise ApiError(404, f"no video {video_id!r}", "not_found", param="video_id")
        return {"id": job.id, "object": "video.deleted", "deleted": True}

    return router


def _find(service: Service, video_id: str) -> Job:
    job = service.store.get(video_id) if ID_PATTERN.fullmatch(video_id) else None
    if job is None:
        raise ApiError(404, f"no video {video_id!r}", "not_found", param="video_id")
    return job


def _view(service: Service, job: Job) -> dict[str, Any]:
    """A job as the API shows it (:class:`VideoJob`): its settings by name, with OpenAI's ``size`` and ``seconds``
    and the deprecated old names beside them."""
    p, s = job.params, job.params.settings
    values = s.values()
    return {
        "id": job.id,
        "status": job.status,
        "progress": service.progress(job),
        "created_at": job.created_at,
        "started_at": job.started_at,
        "completed_at": job.completed_at,
        "error": {"code": "generation_failed", "message": service.scrub(job.error)} if job.error else None,
        **with_old_names(values),
        "prompt": "" if s.prompt is None else s.prompt,  # "" beside a prompt_schedule, as the first API had it
        "model": p.model,
        "size": f"{s.width}x{s.height}",
        "seconds": f"{s.num_frames / s.fps:g}",
        "init_video": p.init_video is not None,
        "init_image": p.init_image is not None,
        "loras": [{"name": name, "scale": scale} for name, scale in p.loras],
    }


def _params(body: Any, model: ModelInfo, service: Service, limits: Limits) -> Params:
    """A validated request with every default filled in; the seed is drawn here, once, and stored with the job.
    Uploads are checked (they must decode) and saved; the caller removes them if the job is not queued."""
    _check_loras(body, service)
    given = _given_settings(body, setting_bounds(limits, model.facts))
    uploads: dict[str, str] = {}
    try:
        for field in ("init_video", "init_image"):
            if getattr(body, field) is not None:
                uploads[field] = service.inputs.save(_decode_upload(field, getattr(body, field), limits.max_upload))
        wanted = min(given.get("num_frames") or limits.max_frames, limits.max_frames)  # no more frames are used
        pictures = _read_uploads(service, uploads, wanted, limits)
        if pictures is not None and pictures.video is not None and "num_frames" not in given:
            given["num_frames"] = min(len(pictures.video), limits.max_frames)
        try:
            request = service.validate(pictures=pictures, **given)
        except SettingError as error:
            raise ApiError(422, str(error), "invalid_value", param=_param(error.field, body)) from None
        loras = tuple((lora.name, float(lora.scale)) for lora in body.loras or ())
        files = {"init_video": uploads.get("init_video"), "init_image": uploads.get("init_image"), "loras": loras}
        return Params(request.settings, model.name, **files)
    except BaseException:
        service.inputs.remove(*uploads.values())
        raise


def _given_settings(body: Any, bounds: dict[str, tuple[Any, Any]]) -> dict[str, Any]:
    """The settings the request names, by their names (old names and OpenAI's ``size`` accepted, the latter
    checked against this server's bounds here, as pydantic checks the others)."""
    given = {name: getattr(body, name) for name in (*SPECS, *ALIASES) if getattr(body, name) is not None}
    try:
        given = canonical(given, "field")
    except SettingError as error:
        raise ApiError(422, str(error), "invalid_value", param=error.field) from None
    if body.size is not None:
        if "width" in given or "height" in given:
            raise ApiError(422, "size: give size or width and height, not both", "invalid_value", param="size")
        given["width"], given["height"] = parse_size(body.size)
        for name in ("width", "height"):
            low, high = bounds[name]
            if not low <= given[name] <= high or given[name] % SIZE_MULTIPLE:
                message = (
                    f"size: each side must be a multiple of {SIZE_MULTIPLE} from {low} to {high}, not {body.size!r}"
                )
                raise ApiError(422, message, "invalid_value", param="size")
    return given


def _param(field: str, body: Any) -> str:
    """The request field an error is about: ``size`` when the client gave the size that way."""
    return "size" if field in ("width", "height") and body.size is not None else field


def _check_loras(body: Any, service: Service) -> None:
    for name in (lora.name for lora in body.loras or ()):
        if service.inputs.lora(name) is None:
            offered = ", ".join(service.inputs.loras()) or "none (start the server with --lora-dir)"
            raise ApiError(
                422, f"loras: no adapter {name!r} on this server; offered: {offered}", "invalid_value", param="loras"
            )


def _decode_upload(field: str, text: str, limit: int) -> bytes:
    """The bytes of a base64 upload (optionally a ``data:<type>;base64,`` URL), at most ``limit`` of them."""
    import base64
    import binascii

    if text.startswith("data:"):
        head, _, text = text.partition(",")
        if not head.endswith(";base64"):
            raise ApiError(422, f"{field}: a data: URL must be base64 (data:<type>;base64,...)", "invalid_value", field)
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, f"{field}: is not valid base64", "invalid_value", param=field) from None
    if not data:
        raise ApiError(422, f"{field}: is empty", "invalid_value", param=field)
    if len(data) > limit:
        raise ApiError(422, f"{field}: {len(data)} bytes is over this server's {limit}", "invalid_value", field)
    return data


UPLOAD_BYTES = 512 * 2**20  # decoded RGB of one request's upload: 64 frames of 1920x1080 fit
_decoding = threading.BoundedSemaphore(1)  # one upload decodes at a time, so all of them stay within one budget


def _read_uploads(service: Service, uploads: dict[str, str], num_frames: int, limits: Limits) -> Any:
    """The uploads decoded, once, as the worker will read them (a ``cinematic.generation.pictures.Pictures`` or
    None): of an init video only the first ``num_frames`` frames. What a file declares is checked against this
    server's budget before anything is decoded (:mod:`cinematic.budget`), so a small file that declares a huge
    canvas costs nothing; one over the budget, one that does not decode, or an init video sent with an init image
    is a 422. Handlers run on the thread pool, never on the event loop."""
    from cinematic.budget import Budget
    from cinematic.generation.pictures import load_pictures

    paths = {field: service.inputs.path(name) for field, name in uploads.items()}
    budget = Budget(max_frames=limits.max_frames, max_bytes=UPLOAD_BYTES)
    try:
        with _decoding:
            return load_pictures(paths.get("init_video"), paths.get("init_image"), num_frames, budget)
    except CinematicError as error:
        message = str(error)
        for path in paths.values():
            message = message.replace(str(path), "the upload")
        param = "init_video" if "init_video" in paths else "init_image"
        raise ApiError(422, f"{param}: {message}", "invalid_value", param=param) from None


def _add_server_routes(app: FastAPI, settings: Settings, service: Service) -> None:
    authorize = _authorizer(settings)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get(
        "/healthz",
        response_model=Health,
        responses={503: {"model": Health, "description": "A worker is dead or stuck: restart the server."}},
        tags=["server"],
        summary="Liveness of each worker, the model, defaults and limits",
    )
    def healthz() -> JSONResponse:
        m = service.model
        healthy, workers = service.health()
        body = {
            "status": "ok" if healthy else "unhealthy",
            "model": m.name,
            "workers": workers,
            "queued": service.store.counts()["queued"],
            "auth": settings.api_key is not None,
            "defaults": _defaults(m.facts),
            "limits": {
                **vars(settings.limits),
                "min_size": m.facts.min_size,
                "max_queue": settings.max_queue,
                "max_body": settings.body_limit,
            },
            "bounds": {name: list(b) for name, b in setting_bounds(settings.limits, m.facts).items()},
            "samplers": _samplers(),
            "loras": service.inputs.loras(),
        }
        return JSONResponse(Health(**body).model_dump(), status_code=200 if healthy else 503)

    @app.get(
        "/metrics",
        response_class=Response,
        dependencies=[Depends(authorize)],
        responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format."}, **documented(401)},
        tags=["server"],
        summary="Prometheus metrics: queue depth, jobs by status, generation seconds",
    )
    def prometheus() -> Response:
        text = metrics.render(service.store.counts(), service.busy_workers, len(service.workers), service.generation)
        return Response(text, media_type=metrics.CONTENT_TYPE)


def _defaults(facts: ModelFacts) -> dict[str, Any]:
    """What each setting is when a request leaves it out, for this model (None: drawn, or unused)."""
    resolved = VideoSettings(prompt="x").resolve(facts)
    return {**resolved.values(), "prompt": None, "seed": None, "strength": 0.6, "size": f"{facts.width}x{facts.height}"}


def _samplers() -> list[str]:
    from cinematic.diffusion import SAMPLERS

    return list(SAMPLERS)
