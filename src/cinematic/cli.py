"""The ``cinematic`` command. It only parses arguments and calls the library; heavy imports happen per command."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, NoReturn

from cinematic.errors import CinematicError
from cinematic.settings import add_arguments, spec

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n}"


def cmd_info(args: argparse.Namespace) -> None:
    from cinematic.weights import build_networks, open_source
    from cinematic.weights.files import dtype_names, is_safetensors, stored_dtype

    source = open_source(args.model)
    networks = build_networks(source.config)
    rows = []
    for name, network in networks.items():
        path = source.files[name]
        # Safetensors files are checked against their headers without reading the tensors; pickled files go
        # through the very reader loading uses (weights-only, legacy formats included).
        stored = (
            stored_dtype(path)
            if is_safetensors(path)
            else dtype_names(t.dtype for t in source.readers[name]().values())
        )
        params = sum(p.numel() for p in network.parameters())
        rel = path.relative_to(source.folder) if path.is_relative_to(source.folder) else path
        rows.append(f"{name:<13} {params:>15,}  {stored:<10} {_size(path.stat().st_size):>10}  {rel}")
    print(f"model:   {source.folder}")
    print(f"format:  {source.format}")
    d = source.config.defaults
    print(f"trained: {d.frames} frames, {d.width}x{d.height}, {d.fps} fps")
    print(f"{'component':<13} {'parameters':>15}  {'stored as':<10} {'size':>10}  file")
    print("\n".join(rows))
    tokenizer = source.tokenizer if source.tokenizer and (source.tokenizer / "vocab.json").is_file() else None
    print(f"tokenizer: {tokenizer or 'not included (taken from --tokenizer or the hub when loading)'}")


def cmd_convert(args: argparse.Namespace) -> None:
    import torch

    from cinematic.weights import convert

    out = convert(args.src, args.dst, dtype=getattr(torch, DTYPES[args.dtype]), tokenizer=args.tokenizer)
    print(f"wrote {out} ({args.dtype})")


def _output_paths(output: str | None, prompt: str, seed: int, count: int) -> list[Path]:
    """``-o clip.mp4`` names the video; several videos get ``clip-1.mp4``, ``clip-2.mp4``...; the default name is
    made from the prompt and the seed."""
    if output is None:
        slug = "-".join("".join(c if c.isalnum() else " " for c in prompt.lower()).split()[:8]) or "video"
        output = f"{slug}-{seed}.mp4"
    path = Path(output).expanduser()
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i + 1}{path.suffix}") for i in range(count)]


def _check_outputs(paths: list[Path], overwrite: bool) -> None:
    from cinematic import video

    for path in paths:
        video.check_writable(path)
        if path.exists() and not overwrite:
            raise CinematicError(f"{path} already exists; pass --overwrite to replace it or choose another name")


def _lora_specs(specs: list[str]) -> list[tuple[str, float]]:
    """``--lora path[:scale]`` values (a file, a folder or a hub id), checked (the files exist, the scales are
    numbers) before any heavy work."""
    from cinematic.lora_loading import lora_file, parse_spec

    parsed = [parse_spec(spec) for spec in specs]
    for path, _ in parsed:
        lora_file(path)
    return parsed


def _given_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings of the command line, checked against their declared types and bounds before anything loads;
    the first prompt of a schedule names the output file."""
    from cinematic.diffusion.windows import parse_prompt_schedule
    from cinematic.settings import SettingError, from_arguments, settings_from

    given = from_arguments(args)
    if args.prompt is not None and not args.prompt.strip():
        raise SettingError("prompt", "is blank; describe the video to generate (or give --prompt-schedule)")
    if (args.prompt is None) == (args.prompt_schedule is None):
        raise SettingError("prompt", "give a prompt or --prompt-schedule (one of them)")
    settings_from({"prompt": args.prompt, **given})  # types and bounds: one line, exit 2
    if args.prompt_schedule is not None:
        try:
            args.prompt = parse_prompt_schedule(args.prompt_schedule, given.get("num_frames"))[0][1]
        except CinematicError as error:
            raise SettingError("prompt_schedule", str(error)) from None
        return given
    return {"prompt": args.prompt, **given}


def _device(args: argparse.Namespace) -> str:
    """The device to run on, checked (it exists, and this torch can use it) with the acceleration flags."""
    import torch

    from cinematic.devices import KINDS, device_problem
    from cinematic.pipeline import check_acceleration

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    problem = device_problem(device)
    allowed = f"allowed: {', '.join(KINDS)}, cuda:N"
    if problem is not None and problem.reason == "unknown":
        raise CinematicError(f"--device: unknown device {device!r}; {allowed}")
    if problem is not None and problem.reason == "unsupported":
        raise CinematicError(f"--device: cannot generate on {device!r}; {allowed}")
    if problem is not None:
        raise CinematicError(f"--device {device}: {problem.text}; use --device cpu")
    check_acceleration(args.compile, args.cuda_graphs, device)
    return device


def _load_pipeline(args: argparse.Namespace, device: str, loras: list[tuple[str, float]]) -> Any:
    import torch

    from cinematic.allocator import keep_freed_memory
    from cinematic.pipeline import Pipeline

    if torch.device(device).type == "cpu":
        keep_freed_memory()  # process-wide, this command's to make: the steps reuse the heap (cinematic.allocator)
    dtype, compute = (getattr(torch, DTYPES[d]) if d else None for d in (args.dtype, args.compute))
    pipe = Pipeline.from_pretrained(
        args.model, device=device, dtype=dtype, tokenizer=args.tokenizer, compute_dtype=compute, int8=args.int8,
        winograd=not args.no_winograd, loras=loras, merge_loras=args.lora_merge, compile=args.compile,
        cuda_graphs=args.cuda_graphs,
    )  # fmt: skip
    # One video and done: the text encoder is not needed after the prompts, unless asked to stay.
    free = not args.keep_text_encoder
    batched = args.batched_guidance or pipe.memory.batched_guidance
    pipe.memory = replace(pipe.memory, free_text_encoder=free, batched_guidance=batched)
    pipe.check_memory = not args.no_memory_check
    return pipe


def cmd_generate(args: argparse.Namespace) -> None:
    from cinematic.generation.pictures import load_pictures
    from cinematic.settings import random_seed

    settings = _given_settings(args)
    device = _device(args)
    if settings.get("strength") is not None and args.init_video is None:
        raise CinematicError("--strength applies to --init-video only")
    # Read and checked before the model loads; of an init video, only the frames the call uses.
    pictures = load_pictures(args.init_video, args.init_image, settings.get("num_frames"))
    loras = _lora_specs(args.lora)
    settings["seed"] = random_seed() if args.seed is None else args.seed
    paths = _output_paths(args.output, args.prompt, settings["seed"], args.num_videos)
    _check_outputs(paths, args.overwrite)  # before any heavy work: a bad name fails in a second, not after sampling
    if args.seed is None:
        print(f"seed: {settings['seed']}", file=sys.stderr)
    pipe = _load_pipeline(args, device, loras)
    videos = pipe(
        num_videos=args.num_videos, init_video=None if pictures is None else pictures.video,
        init_image=None if pictures is None else pictures.image, low_memory=args.low_memory, **settings,
    )  # fmt: skip
    for clip, path in zip(videos, paths):
        print(f"wrote {clip.save(path)} (seed {clip.metadata['seed']})")


class _Parser(argparse.ArgumentParser):
    """Bad arguments are one line and exit 2, as every other bad input."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="cinematic", description="Text-to-video with the ModelScope text-to-video-ms-1.7b model family."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_generate_parser(commands)

    from cinematic.train.cli import add_distill_parser, add_train_parser

    add_train_parser(commands)
    add_distill_parser(commands)

    from cinematic.eval.cli import add_eval_parser

    add_eval_parser(commands)

    from cinematic.serve.cli import add_serve_parser

    add_serve_parser(commands)

    from cinematic.batch.cli import add_batch_parser

    add_batch_parser(commands)

    info = commands.add_parser("info", help="describe a model: format, parameters, dtypes and file sizes")
    info.add_argument("model", help="a model folder (any layout), a bundled model name, or a hub id")
    info.set_defaults(run=cmd_info)

    convert = commands.add_parser("convert", help="write any supported model in cinematic's fast format")
    convert.add_argument("src", help="a model folder (any layout) or a hub id")
    convert.add_argument("dst", help="a new (or empty) folder to write")
    convert.add_argument("--dtype", choices=sorted(DTYPES), default="fp16", help="stored precision (default fp16)")
    convert.add_argument("--tokenizer", help="a folder with vocab.json and merges.txt, for ModelScope folders")
    convert.set_defaults(run=cmd_convert)
    return parser


def _add_generate_parser(commands: Any) -> None:
    """``cinematic generate``: the prompt, every setting of the table, and how the run goes."""
    gen = commands.add_parser("generate", help="generate a video from a text prompt")
    gen.add_argument("prompt", nargs="?", help=spec("prompt").help)
    gen.add_argument("-o", "--output", help="output file: .mp4 (default), .webm, .gif, .webp, or a folder for PNGs")
    gen.add_argument("--model", default="shapes", help="bundled name, model folder or hub id (default: shapes)")
    gen.add_argument("--num-videos", type=int, default=1, help="videos to make; video i uses seed + i")
    settings = gen.add_argument_group("settings (each also a Python keyword and an API field)")
    add_arguments(settings)
    run = gen.add_argument_group("how it runs (never what it makes, but for --int8 and --compute fp16/bf16)")
    run.add_argument("--device", help="cpu, cuda, cuda:1, mps... (default: cuda if available)")
    run.add_argument(
        "--dtype", choices=sorted(DTYPES),
        help="weights precision (default: on a CPU, the files' own when half precision, else fp32; fp16 on a GPU)",
    )  # fmt: skip
    run.add_argument(
        "--compute", choices=sorted(DTYPES), help="arithmetic precision (default: fp32 on a CPU, fp16 on a GPU; "
        "--dtype's when --dtype is given)",
    )  # fmt: skip
    run.add_argument(
        "--low-memory", action="store_true",
        help="run the two guidance passes one after the other, free the text encoder once the prompt is encoded, "
        "decode one frame at a time, run the feed-forwards in pieces (chosen by itself when only it fits)",
    )  # fmt: skip
    run.add_argument(
        "--batched-guidance", action="store_true",
        help="run the two guidance passes as one batch (the GPU default; on a CPU it needs more memory, no faster)",
    )  # fmt: skip
    run.add_argument("--keep-text-encoder", action="store_true", help="do not free the text encoder after encoding")
    run.add_argument(
        "--no-memory-check", action="store_true",
        help="run even when the estimate says the run will not fit in the memory that is free",
    )  # fmt: skip
    run.add_argument("--int8", action="store_true", help="int8 Linear layers in the UNet (CPU, fp32 compute)")
    run.add_argument(
        "--no-winograd", action="store_true",
        help="PyTorch's own 3x3 convolutions instead of Winograd's (CPU, fp32 compute; same results to fp32 rounding)",
    )  # fmt: skip
    run.add_argument(
        "--compile", nargs="?", const="default", metavar="MODE",
        help="run the UNet through torch.compile (MODE: default, reduce-overhead, max-autotune, "
        "max-autotune-no-cudagraphs); the first step compiles, minutes for the full model",
    )  # fmt: skip
    run.add_argument(
        "--cuda-graphs", action="store_true",
        help="record the UNet's step as a CUDA graph and replay it (CUDA only; not with --cache-interval or --freeu)",
    )  # fmt: skip
    start = gen.add_argument_group("starting from pictures")
    start.add_argument("--init-video", metavar="CLIP", help="video-to-video: restyle or upscale this clip")
    start.add_argument("--init-image", metavar="IMAGE", help="animate this picture: it stays the first frame")
    gen.add_argument("--tokenizer", help="folder with vocab.json and merges.txt, for ModelScope folders without one")
    gen.add_argument(
        "--lora", action="append", default=[], metavar="PATH[:SCALE]",
        help="apply a LoRA adapter at strength SCALE (default 1); repeat for several. PATH: a file, a folder or a hub "
        "id (owner/name[/folder]); cinematic's, diffusers' and PEFT layouts, and the few-step students T2V-Turbo-MS "
        "(unet_lora.pt) and MCM, which also set their sampler defaults (docs/few-step.md)",
    )  # fmt: skip
    gen.add_argument("--lora-merge", action="store_true", help="fold the LoRA adapters into the weights (faster)")
    gen.add_argument("--overwrite", action="store_true", help="replace existing output files")
    gen.set_defaults(run=cmd_generate)


def _version() -> str:
    from cinematic import __version__

    return __version__


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so that it unwinds as Ctrl-C does: temporary files are removed."""


def _terminate(signum: int, frame: Any) -> NoReturn:
    raise _Terminated


@contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """While the command runs, SIGTERM unwinds it as Ctrl-C does; the previous handler is restored after. The
    entry point does this, not the library (a library call does not change the process)."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)  # None: set outside Python


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help, --version, or a bad argument (already reported in one line)
        return int(done.code or 0)
    try:
        with _sigterm_unwinds():
            code = args.run(args)  # None, or a command's own exit code (batch: 1 when a line failed)
    except CinematicError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except _Terminated:
        print("terminated; no output file was written", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("interrupted; no output file was written", file=sys.stderr)
        return 130
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
