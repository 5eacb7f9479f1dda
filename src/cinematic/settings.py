"""Every generation setting, declared once.

:class:`Settings` is the table: each field is one setting with its one name (diffusers' where diffusers has one),
its type, default, bounds and help text. Everything a user sees is derived from it: the Python keywords of
``Pipeline.__call__``, the flags of ``cinematic generate`` and ``cinematic eval`` (``num_frames`` -> ``--num-frames``),
the fields of the server's request and job (and so its OpenAPI schema), the parameters the job store keeps, and the
metadata written into every video file. A bad value raises :class:`SettingError`, which names its field.

Three kinds of default:

- a value (``eta=0``);
- ``None`` resolved from the model, in one place (:meth:`Settings.resolve`): ``num_frames``, ``height``, ``width``,
  ``fps`` and ``window`` default to what the model was trained on; ``sampler``, ``num_inference_steps``,
  ``guidance_scale`` and ``timestep_scaling`` to what it is sampled with (its ``Defaults``: DDIM 50 at guidance 9
  for most, 4 ``lcm`` steps for a few-step model); ``window_stride`` to half a window, ``seed`` to a drawn one;
- ``None`` meaning "not used" (``negative_prompt``, ``prompt_schedule``, ``strength`` without an init video).

Renamed settings keep their old names as deprecated aliases (``steps``, ``guidance``, ``frames``, ``negative``):
accepted everywhere a name is read (keywords, flags, request fields, stored jobs), with a ``DeprecationWarning``.
The server also accepts OpenAI's ``size`` (``"WIDTHxHEIGHT"``) for ``width`` and ``height``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import random
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from cinematic.errors import CinematicError

SAMPLER_NAMES = ("ddim", "dpmpp_2m", "dpmpp_2m_karras", "euler", "euler_ancestral", "lcm")  # diffusion.samplers
SEED_RANGE = 2**32  # seeds are unsigned 32-bit, as users copy them between tools
SIZE_MULTIPLE = 8
MIN_SIZE = 64  # for models trained at that size or more; a model trained smaller allows its own size
MAX_SIZE = 2048
MAX_FRAMES = 1024
MAX_PROMPT = 10_000  # characters; the tokenizer keeps the first 77 tokens, and says so when it cuts


class SettingError(CinematicError):
    """A bad value for one setting; ``field`` is its name."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class Spec:
    """How one setting is checked and shown: bounds (inclusive), choices, a multiple, help text, old names."""

    help: str
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] | None = None
    multiple_of: int | None = None
    aliases: tuple[str, ...] = ()
    model_default: str | None = None  # the ModelFacts field a None resolves to
    metavar: str | None = None
    nonblank: bool = False  # strings: must hold more than white space
    max_length: int | None = None  # strings: the most characters

    def allowed(self, kind: type, low: float | None = None, high: float | None = None) -> str:
        """What values are allowed, in words (``low`` and ``high`` override the declared bounds)."""
        low = self.low if low is None else low
        high = self.high if high is None else high
        if self.choices:
            return "one of " + ", ".join(self.choices)
        if kind is bool:
            return "true or false"
        if kind is str:
            what = "a non-blank string" if self.nonblank else "a string"
            return what + (f" of at most {self.max_length} characters" if self.max_length else "")
        what = "an integer" if kind is int else "a number"
        if self.multiple_of:
            what = f"a multiple of {self.multiple_of}"
        if low is not None and high is not None:
            return f"{what} from {low:g} to {high:g}"
        return f"{what} of at least {low:g}" if low is not None else what


def setting(default: Any, help: str, **spec: Any) -> Any:  # noqa: A002 - the help text
    return field(default=default, metadata={"spec": Spec(help, **spec)})


@dataclass(frozen=True)
class ModelFacts:
    """What a model's settings default to and are bounded by: its trained clip, its schedule, its UNet depth."""

    num_frames: int
    height: int
    width: int
    fps: float
    max_steps: int  # the schedule's training timesteps: more sampling steps than that have no meaning
    levels: int  # UNet levels, the deepest cache_depth
    sampler: str  # what the model is sampled with when a call names nothing (its Defaults)
    num_inference_steps: int
    guidance_scale: float
    timestep_scaling: float
    guidance_embedding: bool = False  # the UNet takes the guidance scale as an input (one pass per step)

    @classmethod
    def of(cls, config: Any) -> ModelFacts:
        """The facts of a ``cinematic.models.components.ModelConfig``."""
        d = config.defaults
        # time_cond_proj_dim: the UNet config's guidance embedding width, None without one (absent in older configs).
        embedded = getattr(config.unet, "time_cond_proj_dim", None) is not None
        return cls(
            d.frames, d.height, d.width, d.fps, config.schedule.num_train_timesteps, len(config.unet.levels),
            d.sampler, d.num_inference_steps, d.guidance_scale, d.timestep_scaling, embedded,
        )  # fmt: skip

    @property
    def min_size(self) -> int:
        return min(MIN_SIZE, self.height, self.width)

    def bounds(self) -> list[tuple[str, int, int]]:
        """``(setting, low, high)`` for the settings whose bounds depend on the model."""
        return [
            ("height", self.min_size, MAX_SIZE),
            ("width", self.min_size, MAX_SIZE),
            ("num_inference_steps", 1, self.max_steps),
            ("cache_depth", 1, self.levels),
        ]


@dataclass(frozen=True)
class Settings:
    """One video's settings (the table). Unresolved fields are None; :meth:`resolve` fills them from the model."""

    prompt: str | None = setting(
        None, "what the video shows, in English (or give prompt_schedule)", nonblank=True, max_length=MAX_PROMPT
    )
    negative_prompt: str | None = setting(
        None, "what to steer away from (default: the empty prompt, as the original)", aliases=("negative",),
        max_length=MAX_PROMPT,
    )  # fmt: skip
    num_frames: int | None = setting(
        None, "frames in the clip (default: the model's, or the init video's)", low=1, high=MAX_FRAMES,
        aliases=("frames",), model_default="num_frames",
    )  # fmt: skip
    height: int | None = setting(
        None, "height in pixels (default: the model's)", low=SIZE_MULTIPLE, high=MAX_SIZE,
        multiple_of=SIZE_MULTIPLE, model_default="height",
    )  # fmt: skip
    width: int | None = setting(
        None, "width in pixels (default: the model's)", low=SIZE_MULTIPLE, high=MAX_SIZE,
        multiple_of=SIZE_MULTIPLE, model_default="width",
    )  # fmt: skip
    num_inference_steps: int | None = setting(
        None, "denoising steps (default: the model's, 50; 4 for a few-step model; at most 50 with lcm)", low=1,
        high=1000, aliases=("steps",), model_default="num_inference_steps",
    )  # fmt: skip
    guidance_scale: float | None = setting(
        None, "classifier-free guidance scale (default: the model's, 9; 1 with lcm on a model without a guidance "
        "embedding)", low=0, high=100, aliases=("guidance",), model_default="guidance_scale",
    )  # fmt: skip
    seed: int | None = setting(None, "random seed; video i of a call uses seed + i (default: drawn)", low=0,
                               high=SEED_RANGE - 1)  # fmt: skip
    sampler: str | None = setting(
        None, "the sampler (default: the model's, ddim; lcm for a few-step model)", choices=SAMPLER_NAMES,
        model_default="sampler",
    )  # fmt: skip
    eta: float = setting(0.0, "DDIM's stochasticity (0: deterministic; euler_ancestral: 0 means its own 1)", low=0,
                         high=1)  # fmt: skip
    timestep_scaling: float | None = setting(
        None, "lcm only: the timestep scaling of the consistency boundary conditions (default: the model's, 10; "
        "MCM's LoRAs use 4)", low=0.01, high=1000, model_default="timestep_scaling", metavar="S",
    )  # fmt: skip
    fps: float | None = setting(None, "frame rate of the file (default: the model's)", low=1, high=240,
                                model_default="fps")  # fmt: skip
    # Fast modes (docs/performance.md): each changes the result a little, all off by default.
    cache_interval: int = setting(
        1, "feature caching: a full UNet step every N steps, the shallow levels only in between (1: off)", low=1,
        high=1000, metavar="N",
    )  # fmt: skip
    cache_depth: int = setting(1, "UNet levels recomputed on cached steps, from the top", low=1, high=8, metavar="D")
    guidance_stop: float = setting(
        1.0, "drop the unconditional pass from this fraction of sampling on, e.g. 0.8 (1: never)", low=0, high=1,
        metavar="F",
    )  # fmt: skip
    # Starting from pictures (cinematic.pipeline.pictures), FreeU and FreeInit.
    strength: float | None = setting(
        None, "with an init video: how much to change it, 0 (keep) to 1 (ignore it) (default 0.6)", low=0, high=1,
        metavar="S",
    )  # fmt: skip
    loop: bool = setting(False, "pin the last frame to the first (needs 2+ frames)")
    freeu: bool = setting(False, "FreeU (b1=1.2, b2=1.4, s1=0.9, s2=0.2)")
    freeinit: int = setting(0, "FreeInit: sample N more times from low-frequency re-initialised noise", low=0,
                            high=10, metavar="N")  # fmt: skip
    # Long videos (cinematic.diffusion.windows).
    prompt_schedule: str | None = setting(
        None, 'prompts over time, in place of prompt: "0: a red circle moving right | 32: a red circle moving left"',
        metavar="SCHEDULE", nonblank=True, max_length=4 * MAX_PROMPT,
    )  # fmt: skip
    window: int | None = setting(
        None, "clips longer than this run through the UNet in overlapping windows of this many frames; 0: the whole "
        "clip at once (default: the model's trained length)", low=0, high=MAX_FRAMES, model_default="num_frames",
        metavar="W",
    )  # fmt: skip
    window_stride: int | None = setting(
        None, "frames between window starts (default: half a window)", low=1, high=MAX_FRAMES, metavar="S"
    )

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                object.__setattr__(self, f.name, check(f.name, value))

    @property
    def windowed(self) -> bool:
        return 0 < (self.window or 0) < (self.num_frames or 0)

    def resolve(self, model: ModelFacts, init_frames: int | None = None, restyling: bool = False) -> Settings:
        """Every default filled in and every rule that needs the model or several settings checked.
        ``init_frames``: the init video's frame count (the default clip length); ``restyling``: whether there is an
        init video (``strength`` means nothing without one)."""
        if (self.prompt is None) == (self.prompt_schedule is None):
            which = "is required" if self.prompt is None else "and prompt_schedule exclude each other"
            raise SettingError("prompt", f"{which} (give a prompt or a prompt_schedule)")
        if self.strength is not None and not restyling:
            raise SettingError("strength", "applies to an init video only")
        given = {f.name: getattr(self, f.name) for f in fields(self)}
        for f in fields(self):
            source = spec(f.name).model_default
            if given[f.name] is None and source is not None:
                given[f.name] = getattr(model, source)
        if self.guidance_scale is None and given["sampler"] == "lcm" and not model.guidance_embedding:
            given["guidance_scale"] = 1.0  # lcm without a guidance embedding: the conditional pass alone
        if self.num_frames is None and init_frames is not None:
            given["num_frames"] = init_frames
        given["seed"] = random_seed() if self.seed is None else self.seed
        given["strength"] = (0.6 if self.strength is None else self.strength) if restyling else None
        if given["window_stride"] is None:
            given["window_stride"] = max(1, given["window"] // 2)
        resolved = dataclasses.replace(self, **given)
        _check_with_model(resolved, model)
        return resolved

    def values(self) -> dict[str, Any]:
        """Every setting by name (the file metadata, the stored job)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def unconditional_pass(self, model: ModelFacts) -> bool:
        """Whether sampling these resolved settings runs the unconditional (negative prompt) pass of classifier-free
        guidance: a scale other than 1 on a model without a guidance embedding. A model with one takes the scale as
        an input, and ``lcm`` on a model without one runs at scale 1 (:meth:`resolve` sees to it): one UNet pass
        per step either way."""
        return self.guidance_scale != 1.0 and not model.guidance_embedding


def spec(name: str) -> Spec:
    return SPECS[name]


def kind(name: str) -> type:
    """A setting's value type: int, float, str or bool."""
    return KINDS[name]


def check(name: str, value: Any, high: float | None = None) -> Any:
    """``value`` for setting ``name``, checked against its declared type and bounds (``high``: a narrower upper
    bound, a server's limit); ints are accepted for floats."""
    s, k = spec(name), kind(name)
    ok = _is(k, value)
    if ok and k in (int, float):
        value = k(value)
        top = s.high if high is None else min(high, s.high if s.high is not None else high)
        ok = math.isfinite(value) and (s.low is None or value >= s.low) and (top is None or value <= top)
        ok = ok and not (s.multiple_of and value % s.multiple_of)
    if ok and k is str:
        ok = (bool(value.strip()) or not s.nonblank) and (s.choices is None or value in s.choices)
        ok = ok and (s.max_length is None or len(value) <= s.max_length)
    if ok and k is str:
        _check_utf8(name, value)
    if not ok:
        shown = value if not isinstance(value, str) or len(value) < 80 else f"{value[:40]}... ({len(value)} characters)"
        raise SettingError(name, f"must be {s.allowed(k, high=high)}, not {shown!r}")
    return value


def _check_utf8(name: str, text: str) -> None:
    """Text must be encodable as UTF-8 (it is stored in file metadata and sent as JSON). Python keeps a command-line
    byte that is not UTF-8 as a lone surrogate (U+DC80 to U+DCFF, "surrogateescape"); name that byte."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        char = text[error.start]
        what = f"the byte 0x{ord(char) - 0xDC00:02x}" if 0xDC80 <= ord(char) <= 0xDCFF else f"{char!r}"
        raise SettingError(name, f"must be UTF-8 text, not {what} at character {error.start + 1}") from None


def _is(k: type, value: Any) -> bool:
    if isinstance(value, bool):
        return k is bool
    if k is float:
        return isinstance(value, int | float)
    return isinstance(value, k)


def _check_with_model(s: Settings, model: ModelFacts) -> None:
    """The bounds that depend on the model, and the rules between settings."""
    for name, low, high in model.bounds():
        value = getattr(s, name)
        if not low <= value <= high:
            raise SettingError(name, f"must be {spec(name).allowed(kind(name), low, high)} for this model, not {value}")
    if 0 < s.window < 2:
        raise SettingError("window", f"must be 0 (the whole clip at once) or at least 2 frames, not {s.window}")
    if s.window_stride > max(s.window, 1):
        raise SettingError("window_stride", f"must be an integer from 1 to the window, {s.window}, not "
                                            f"{s.window_stride}")  # fmt: skip
    _check_one_pass(s, model)
    if s.loop and s.num_frames < 2:
        raise SettingError("loop", f"a looping video needs at least 2 frames, not {s.num_frames}")
    if s.prompt_schedule is not None:
        from cinematic.diffusion.windows import parse_prompt_schedule

        try:
            parse_prompt_schedule(s.prompt_schedule, s.num_frames)
        except CinematicError as error:
            raise SettingError("prompt_schedule", str(error)) from None


def _check_one_pass(s: Settings, model: ModelFacts) -> None:
    """What one UNet pass per step rules out: ``lcm`` is a consistency model's sampler, and a model with a guidance
    embedding (a distilled student) is guided through it, with no unconditional pass to steer or to drop."""
    from cinematic.diffusion.schedule import LCM_ORIGIN_STEPS

    lcm = s.sampler == "lcm"
    if lcm and not model.guidance_embedding and s.guidance_scale != 1.0:
        raise SettingError("guidance_scale", f"must be 1 with the lcm sampler on a model without a guidance "
                           f"embedding (one conditional UNet pass per step), not {s.guidance_scale:g}")  # fmt: skip
    if lcm and s.num_inference_steps > LCM_ORIGIN_STEPS:
        raise SettingError("num_inference_steps", f"must be an integer from 1 to {LCM_ORIGIN_STEPS} with the lcm "
                           f"sampler (its steps come from the {LCM_ORIGIN_STEPS}-step grid it was distilled on), not "
                           f"{s.num_inference_steps}")  # fmt: skip
    if lcm and s.eta != 0:
        raise SettingError("eta", f"does not apply to the lcm sampler, which draws fresh noise between its steps; "
                                  f"leave it at 0, not {s.eta:g}")  # fmt: skip
    if lcm and s.cache_interval > 1:
        raise SettingError("cache_interval", f"must be 1 with the lcm sampler: feature caching reuses deep features "
                           f"between neighbouring steps, and lcm's few steps are far apart and freshly noised, not "
                           f"{s.cache_interval}")  # fmt: skip
    if not (lcm or model.guidance_embedding):
        return
    why = "this model takes the guidance scale as an input" if model.guidance_embedding else "the lcm sampler"
    if s.negative_prompt:
        raise SettingError("negative_prompt", f"needs the unconditional UNet pass, and there is none ({why}: one pass "
                                              f"per step); leave it out")  # fmt: skip
    if s.guidance_stop < 1.0:
        raise SettingError("guidance_stop", f"drops the unconditional UNet pass, and there is none ({why}: one pass "
                                            f"per step); leave it at 1, not {s.guidance_stop:g}")  # fmt: skip


def check_prompts(prompt: Any, schedule: str | None) -> tuple[str | None, ...]:
    """The prompts of a call (one, or a list made in one batch), checked; None when a schedule takes its place."""
    prompts = (prompt,) if isinstance(prompt, str) or prompt is None else tuple(prompt)
    if not prompts or not all(isinstance(p, str) or p is None for p in prompts):
        raise SettingError("prompt", "must be a string or a non-empty list of strings")
    if schedule is not None and prompts == ("",):
        return (None,)  # "" beside a schedule, as the first API took it: the prompt is the schedule's
    if len(prompts) > 1 and schedule is not None:
        raise SettingError("prompt_schedule", "takes the place of one prompt; give one prompt, not a list")
    for p in prompts[1:]:
        check("prompt", p)
    return prompts


def random_seed() -> int:
    return random.SystemRandom().randrange(SEED_RANGE)


def canonical(values: Mapping[str, Any], surface: str = "keyword") -> dict[str, Any]:
    """``values`` with deprecated names replaced by the setting's name (a warning says so); unknown names are an
    error naming them. ``surface`` words the warning ("keyword", "field", "flag")."""
    out: dict[str, Any] = {}
    for name, value in values.items():
        new = ALIASES.get(name, name)
        if new not in SPECS:
            raise SettingError(name, f"is not a setting; the settings are {', '.join(SPECS)}")
        if new != name:
            warnings.warn(f"the {surface} {name!r} is deprecated; use {new!r}", DeprecationWarning, stacklevel=3)
            if new in values:
                raise SettingError(new, f"given twice, as {new!r} and as its old name {name!r}")
        out[new] = value
    return out


def with_old_names(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` (settings by name) and the same values under their deprecated names too, for readers of the file
    metadata and the API written before the renaming (``metadata["steps"]`` still works, for now)."""
    return {**values, **{old: values[new] for old, new in ALIASES.items() if new in values}}


def settings_from(values: Mapping[str, Any], surface: str = "keyword") -> Settings:
    """A :class:`Settings` from names and values (old names accepted); None means "the default"."""
    given = {k: v for k, v in canonical(values, surface).items() if v is not None}
    return Settings(**given)


SPECS: dict[str, Spec] = {f.name: f.metadata["spec"] for f in fields(Settings)}
KINDS: dict[str, type] = {
    f.name: next(t for t in (bool, int, float, str) if t.__name__ in str(f.type)) for f in fields(Settings)
}
ALIASES: dict[str, str] = {old: name for name, s in SPECS.items() for old in s.aliases}


# --- how the settings appear on a command line -----------------------------------------------------------------


class _Flag(argparse.Action):
    """Stores a setting's value under its name; an old name still works, with a note on stderr."""

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: str | None = None) -> None:
        if option_string in self.deprecated:
            print(f"note: {option_string} is deprecated; use {self.option_strings[0]}", file=sys.stderr)
        setattr(namespace, self.dest, True if self.nargs == 0 else values)

    deprecated: tuple[str, ...] = ()


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(parser: Any, names: Sequence[str] | None = None) -> None:
    """Add a flag for each setting of ``names`` (default: all but the prompt) to an argparse parser: ``--num-frames``
    for ``num_frames``, the old names as deprecated aliases, the value type, the help with default and bounds. An
    absent flag leaves None (the setting's default)."""
    defaults = Settings()
    for name in names or [n for n in SPECS if n != "prompt"]:
        s, k = spec(name), kind(name)
        default = getattr(defaults, name)
        bounds = f"; {s.allowed(k)}" if k in (int, float) or s.choices else ""
        shown = f"{default:g}" if isinstance(default, float) else str(default)
        text = s.help + bounds + ("" if default is None or k is bool else f" (default {shown})")
        aliases = tuple(flag(old) for old in s.aliases)
        if aliases:
            text += f" [{', '.join(aliases)}: deprecated]"
        action = type("Flag", (_Flag,), {"deprecated": aliases})
        extra: dict[str, Any] = {"nargs": 0} if k is bool else {"type": k, "metavar": s.metavar}
        parser.add_argument(flag(name), *aliases, dest=name, action=action, default=None, help=text, **extra)


def from_arguments(args: Any, names: Sequence[str] | None = None) -> dict[str, Any]:
    """The settings given on the command line (absent flags left out)."""
    wanted = names or [n for n in SPECS if n != "prompt"]
    return {name: getattr(args, name) for name in wanted if getattr(args, name, None) is not None}
