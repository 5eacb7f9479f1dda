"""What ``cinematic serve`` is told: one frozen dataclass, filled from flags, then environment variables, then defaults.

Every setting has a ``CINEMATIC_*`` environment variable (listed in ``ENV``) so that a container or a systemd unit
can configure the server without a command line. Nothing here imports FastAPI or torch.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cinematic.errors import CinematicError


@dataclass(frozen=True)
class Limits:
    """The most one request may ask for; a request over any of them gets 422 naming the field."""

    max_frames: int = 64
    max_size: int = 1024  # pixels, each side
    max_steps: int = 200
    max_prompt: int = 1000  # characters, for the prompt and the negative prompt
    max_upload: int = 32 * 2**20  # bytes of an init video or init image, before base64


@dataclass(frozen=True)
class Settings:
    model: str = "shapes"
    data: Path = Path("cinematic-data")
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_queue: int = 256  # jobs waiting for a worker; one more gets 429
    devices: tuple[str, ...] = ()  # one worker per device; () picks every CUDA device, else the CPU
    dtype: str | None = None  # fp32, fp16 or bf16; None: the library's default (Pipeline.from_pretrained)
    threads: int | None = None  # torch CPU threads of the process (service.configure_process); None: torch's
    log_level: str = "info"
    lora_dir: Path | None = None  # LoRA adapters requests may name: <lora_dir>/<name>.safetensors or <name>/
    limits: Limits = field(default_factory=Limits)
    max_body: int | None = None  # bytes of a request body, beyond which it is a 413; None: see body_limit
    store: str | None = None  # a postgresql:// URL shared by a fleet of servers; None: SQLite in the data folder
    role: str = "all"  # api (HTTP, no worker), worker (workers, no HTTP) or all; api and worker need a shared store
    lease: int = 30  # seconds a worker holds a job of a shared store without renewing it before it is taken again

    @property
    def body_limit(self) -> int:
        """``max_body``, or room for a request with both uploads at ``max_upload``: base64 makes 4 bytes of 3,
        and JSON_ROOM is ample for the prompts and every other field (JSON-escaped)."""
        if self.max_body is not None:
            return self.max_body
        return UPLOAD_FIELDS * 4 * math.ceil(self.limits.max_upload / 3) + JSON_ROOM


UPLOAD_FIELDS = 2  # init_video and init_image
JSON_ROOM = 2**20


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError("not an integer") from None


def _positive(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise ValueError("must be at least 1")
    return value


def _port(text: str) -> int:
    value = _int(text)
    if not 0 <= value <= 65535:
        raise ValueError("must be from 0 to 65535")
    return value


def _devices(text: str) -> tuple[str, ...]:
    return tuple(d.strip() for d in text.split(",") if d.strip())


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}")
        return text

    return parse


def _store(text: str) -> str | None:
    if text == "sqlite":
        return None
    if not text.startswith(STORE_SCHEMES):
        raise ValueError("must be sqlite (the data folder's own store) or a postgresql://USER@HOST/DATABASE URL")
    return text


DTYPES = ("fp32", "fp16", "bf16")
ROLES = ("all", "api", "worker")
STORE_SCHEMES = ("postgresql://", "postgres://")
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")

# setting -> (environment variable, parser of its text). Limits are flattened: "max_frames" is Limits.max_frames.
ENV: dict[str, tuple[str, Callable[[str], Any]]] = {
    "model": ("CINEMATIC_MODEL", str),
    "data": ("CINEMATIC_DATA", Path),
    "host": ("CINEMATIC_HOST", str),
    "port": ("CINEMATIC_PORT", _port),
    "api_key": ("CINEMATIC_API_KEY", str),
    "max_queue": ("CINEMATIC_MAX_QUEUE", _positive),
    "devices": ("CINEMATIC_DEVICES", _devices),
    "dtype": ("CINEMATIC_DTYPE", _choice(*DTYPES)),
    "threads": ("CINEMATIC_THREADS", _positive),
    "log_level": ("CINEMATIC_LOG_LEVEL", _choice(*LOG_LEVELS)),
    "lora_dir": ("CINEMATIC_LORA_DIR", Path),
    "max_body": ("CINEMATIC_MAX_BODY", _positive),
    "store": ("CINEMATIC_STORE", _store),
    "role": ("CINEMATIC_ROLE", _choice(*ROLES)),
    "lease": ("CINEMATIC_LEASE", _positive),
    "max_frames": ("CINEMATIC_MAX_FRAMES", _positive),
    "max_size": ("CINEMATIC_MAX_SIZE", _positive),
    "max_steps": ("CINEMATIC_MAX_STEPS", _positive),
    "max_prompt": ("CINEMATIC_MAX_PROMPT", _positive),
    "max_upload": ("CINEMATIC_MAX_UPLOAD", _positive),
}


def resolve(given: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from flags (``given``, None where not passed), else ``CINEMATIC_*`` variables, else defaults.

    A malformed variable is a CinematicError that names it, so a typo in a unit file is one clear line.
    """
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for name, (variable, parse) in ENV.items():
        if given.get(name) is not None:
            values[name] = given[name]
        elif environ.get(variable, "") != "":
            try:
                values[name] = parse(environ[variable])
            except ValueError as error:
                raise CinematicError(f"{variable}={environ[variable]!r} is not valid: {error}") from error
    limit_names = {f.name for f in dataclasses.fields(Limits)}
    limits = Limits(**{k: v for k, v in values.items() if k in limit_names})
    settings = Settings(**{k: v for k, v in values.items() if k not in limit_names}, limits=limits)
    lora_dir = None if settings.lora_dir is None else Path(settings.lora_dir).expanduser()
    store = None if settings.store in (None, "sqlite") else settings.store
    settings = dataclasses.replace(settings, data=Path(settings.data).expanduser(), lora_dir=lora_dir, store=store)
    check_role(settings)
    return settings


def check_role(settings: Settings) -> None:
    """An API node or a worker node alone is useful only beside others that share its store."""
    if settings.role != "all" and settings.store is None:
        raise CinematicError(
            f"--role {settings.role} needs a store shared with other servers (--store postgresql://...); "
            "with the data folder's own SQLite store use --role all"
        )


def redacted(url: str) -> str:
    """A store URL fit for a log line: its password replaced."""
    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", url)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


def check_exposure(settings: Settings) -> None:
    """Refuse to listen beyond this machine without an API key: anyone who reached the port could use the GPU."""
    if settings.api_key is not None and not settings.api_key.strip():
        raise CinematicError("the API key is empty; pass a non-empty --api-key or CINEMATIC_API_KEY")
    if not is_loopback(settings.host) and not settings.api_key:
        raise CinematicError(
            f"refusing to listen on {settings.host} without an API key: set --api-key or CINEMATIC_API_KEY "
            "(without one, anyone who can reach the port could run jobs), or bind 127.0.0.1"
        )
