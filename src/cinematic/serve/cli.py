"""The ``cinematic serve`` sub-command: settings from flags and ``CINEMATIC_*`` variables, then uvicorn.

Everything that can fail on bad settings fails before serving, in one line with exit code 2: a public address
without a key, a port in use, a busy data folder, an unknown model. Importing this module imports neither FastAPI
nor torch.
"""

from __future__ import annotations

import argparse
import copy
import logging.config
import socket
import sys
import time
from typing import Any

from cinematic.errors import CinematicError
from cinematic.serve.settings import (
    DTYPES,
    ENV,
    LOG_LEVELS,
    ROLES,
    Limits,
    Settings,
    check_exposure,
    redacted,
    resolve,
)

_DEFAULTS: dict[str, Any] = {**vars(Settings()), **vars(Limits())}
# Longer than clients keep idle connections (httpx 5 s, as uvicorn's default): a polling client whose idle
# connection the server closes at the same moment gets a read error instead of an answer.
KEEP_ALIVE_S = 75


def _flag(parser: Any, flag: str, dest: str, help: str, default: str | None = None, **kwargs: Any) -> None:
    """A flag that is None unless given (so the environment can fill it); its help names the default and variable."""
    default = default or _DEFAULTS.get(dest)
    shown = f"default {default}" if default not in (None, ()) else ""
    env = f"env {ENV[dest][0]}"
    parser.add_argument(
        flag, dest=dest, default=None, help=f"{help} ({', '.join(filter(None, [shown, env]))})", **kwargs
    )


def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``serve`` to the ``cinematic`` sub-commands; ``args.run(args)`` runs it."""
    parser = subparsers.add_parser(
        "serve",
        help="serve the HTTP API (OpenAI Videos-shaped) and a web page, with a job queue that survives restarts",
        description="Serve text-to-video over HTTP: POST /v1/videos queues a job, the web page is at /, the "
        "OpenAPI docs at /docs. Jobs and videos live in --data and survive restarts, kill -9 included. Every "
        "flag can also be set by the environment variable shown.",
    )
    _flag(parser, "--model", "model", "bundled name, model folder or hub id")
    _flag(parser, "--host", "host", "address to bind; any non-loopback address needs an API key")
    _flag(parser, "--port", "port", "TCP port; 0 picks a free one", type=int)
    _flag(parser, "--data", "data", "folder for the job store and the video files")
    _flag(parser, "--api-key", "api_key", "require Authorization: Bearer KEY on /v1 and /metrics (prefer the env)")
    _flag(parser, "--max-queue", "max_queue", "jobs that may wait; beyond it POST gets 429", type=int)
    parser.add_argument(
        "--device",
        dest="devices",
        action="append",
        help="a device to run a worker on; repeat for several GPUs (default: every CUDA device, else cpu; "
        f"env {ENV['devices'][0]}, comma-separated)",
    )
    _flag(
        parser,
        "--dtype",
        "dtype",
        "weights precision",
        "fp16 on CUDA; on a CPU the files' own, fp32 compute",
        choices=DTYPES,
    )
    _flag(parser, "--threads", "threads", "torch CPU threads, set once for the server process", "torch's", type=int)
    _flag(parser, "--log-level", "log_level", "log level; info logs every request", choices=LOG_LEVELS)
    _flag(
        parser, "--lora-dir", "lora_dir", "folder of LoRA adapters that requests may name (NAME.safetensors or NAME/)"
    )
    _flag(
        parser,
        "--max-body",
        "max_body",
        "bytes of a request body; beyond it a 413, checked after the API key and before the body is read",
        "base64 of two --max-upload files plus 1 MiB",
        type=int,
    )
    fleet = parser.add_argument_group("a fleet of servers sharing one PostgreSQL database and one --data folder")
    _flag(
        fleet,
        "--store",
        "store",
        "the job store: sqlite (in --data, one server) or postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE, shared "
        "by every server of a fleet (pass the password by the env or ~/.pgpass)",
        "sqlite",
    )
    _flag(fleet, "--role", "role", "all: API and workers; api: no worker; worker: no HTTP", choices=ROLES)
    _flag(fleet, "--lease", "lease", "seconds a dead worker's job waits before another worker takes it", type=int)
    limits = parser.add_argument_group("limits per request (a breach is a 422 naming the field)")
    _flag(limits, "--max-frames", "max_frames", "frames", type=int)
    _flag(limits, "--max-size", "max_size", "pixels per side", type=int)
    _flag(limits, "--max-steps", "max_steps", "denoising steps", type=int)
    _flag(limits, "--max-prompt", "max_prompt", "characters of the prompt and of the negative prompt", type=int)
    _flag(limits, "--max-upload", "max_upload", "bytes of an init video or image", type=int)
    parser.set_defaults(run=cmd_serve)
    return parser


def cmd_serve(args: argparse.Namespace) -> None:
    given = {name: getattr(args, name, None) for name in ENV}
    for name, value in given.items():
        if value is not None and name != "devices":
            try:  # the environment's checks apply to flags too (a port in range, counts of at least 1)
                ENV[name][1](str(value))
            except ValueError as error:
                shown = redacted(str(value)) if name == "store" else value
                raise CinematicError(f"--{name.replace('_', '-')} {shown}: {error}") from error
    given["devices"] = tuple(given["devices"]) if given["devices"] else None
    settings = resolve(given)
    from cinematic.serve.service import check_device

    for device in settings.devices:  # before the port is bound: a bad device is one line, exit 2
        check_device(device)
    try:
        import uvicorn
    except ImportError as error:
        raise CinematicError("serving needs the serve extra: pip install 'cinematic[serve]'") from error
    if settings.role == "worker":
        _run_worker(settings)
        return
    check_exposure(settings)

    listener = _listen(settings.host, settings.port)  # before loading the model: a busy port fails at once
    log_config = _log_config(settings.log_level)
    logging.config.dictConfig(log_config)  # now, so that recovery and model loading are logged like the rest
    from cinematic.serve.app import create_app
    from cinematic.serve.service import configure_process

    configure_process(settings)  # the process's thread count and allocator, once, before the model loads

    try:
        app = create_app(settings)
    except BaseException:
        listener.close()
        raise
    host, port = listener.getsockname()[:2]
    where = f"[{host}]" if ":" in host else host
    workers = ", ".join(w.device for w in app.state.service.workers) or "none"
    print(f"cinematic serve: http://{where}:{port}/ (model {settings.model}, {_where(settings)}, workers {workers})")
    sys.stdout.flush()
    config = uvicorn.Config(app, log_level=settings.log_level, log_config=log_config, timeout_keep_alive=KEEP_ALIVE_S)
    try:
        uvicorn.Server(config).run(sockets=[listener])
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown: the stop was asked for
        pass


def _where(settings: Settings) -> str:
    shared = "" if settings.store is None else f", store {redacted(settings.store)}"
    return f"data {settings.data}{shared}"


def _run_worker(settings: Settings) -> None:
    """A worker node: the workers of ``settings`` on a shared store, no HTTP, until Ctrl-C or SIGTERM (the running
    job goes back to the queue) or until every worker has died (exit 1: let the supervisor restart the node)."""
    logging.config.dictConfig(_log_config(settings.log_level))
    from cinematic.serve.service import Service, configure_process

    configure_process(settings)
    service = Service(settings)
    service.start()
    workers = ", ".join(w.device for w in service.workers)
    print(f"cinematic serve: worker node (model {settings.model}, {_where(settings)}, workers {workers})")
    sys.stdout.flush()
    try:
        while any(worker.is_alive() for worker in service.workers):
            time.sleep(1.0)
    except KeyboardInterrupt:
        return
    finally:
        service.close()
    raise SystemExit("cinematic serve: every worker of this node has died; see the log above")


def _listen(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        listener = socket.socket(family, kind, proto)
    except (OSError, UnicodeError) as error:
        raise CinematicError(f"cannot listen on {host}:{port}: {getattr(error, 'strerror', None) or error}") from error
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
        listener.listen(2048)  # connections made while the model loads wait here instead of being refused
    except OSError as error:
        listener.close()
        raise CinematicError(f"cannot listen on {host}:{port}: {error.strerror}") from error
    return listener


def _log_config(level: str) -> dict[str, Any]:
    """uvicorn's logging, with timestamps, and the workers' job events (logger ``cinematic``) beside it."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    for formatter in config["formatters"].values():
        formatter["fmt"] = "%(asctime)s " + formatter["fmt"]
    config["loggers"]["cinematic"] = {"handlers": ["default"], "level": level.upper(), "propagate": False}
    return config
