"""The ``cinematic`` command. It only parses arguments and calls the library; heavy imports happen per command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cinematic.errors import CinematicError

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n}"


def cmd_info(args: argparse.Namespace) -> None:
    from cinematic.weights import build_networks, open_source
    from cinematic.weights.files import stored_dtype

    source = open_source(args.model)
    networks = build_networks(source.config)
    print(f"model:   {source.folder}")
    print(f"format:  {source.format}")
    d = source.config.defaults
    print(f"trained: {d.frames} frames, {d.width}x{d.height}, {d.fps} fps")
    print(f"{'component':<13} {'parameters':>15}  {'stored as':<10} {'size':>10}  file")
    for name, network in networks.items():
        path = source.files[name]
        params = sum(p.numel() for p in network.parameters())
        rel = path.relative_to(source.folder) if path.is_relative_to(source.folder) else path
        print(f"{name:<13} {params:>15,}  {stored_dtype(path):<10} {_size(path.stat().st_size):>10}  {rel}")
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
    """``--lora path[:scale]`` values, checked (the files exist, the scales are numbers) before any heavy work."""
    from cinematic.lora import parse_spec
    from cinematic.weights.lora_formats import adapter_file

    parsed = [parse_spec(spec) for spec in specs]
    for path, _ in parsed:
        adapter_file(path)
    return parsed


def cmd_generate(args: argparse.Namespace) -> None:
    import torch

    from cinematic.allocator import keep_freed_memory
    from cinematic.pipeline import check_acceleration, check_guidance, check_guidance_stop, check_sampler, random_seed

    if args.prompt_schedule is not None:
        from cinematic.diffusion.windows import parse_prompt_schedule

        schedule = parse_prompt_schedule(args.prompt_schedule, args.frames)
        if args.prompt:
            raise CinematicError("give a prompt or --prompt-schedule, not both")
        args.prompt = schedule[0][1]  # names the output file
    elif not args.prompt or not args.prompt.strip():
        raise CinematicError("the prompt is empty; describe the video to generate (or give --prompt-schedule)")
    check_sampler(args.sampler)
    check_guidance(args.guidance)
    check_guidance_stop(args.guidance_stop)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(device).type == "cpu":
        keep_freed_memory()  # process-wide, this command's to make: the steps reuse the heap (cinematic.allocator)
    check_acceleration(args.compile, args.cuda_graphs, device)
    if args.cache_interval < 1 or args.cache_depth < 1:
        raise CinematicError("--cache-interval and --cache-depth must be at least 1")
    if args.steps < 1 or args.frames is not None and args.frames < 1 or args.num_videos < 1:
        raise CinematicError("--steps, --frames and --num-videos must be at least 1")
    if args.fps is not None and not 0 < args.fps <= 240:
        raise CinematicError(f"--fps must be between 0 and 240, not {args.fps}")
    from cinematic.conditioning import cli_kwargs

    pictures = cli_kwargs(
        args.init_video, args.init_image, args.strength, args.loop, args.frames, args.freeu, args.freeinit
    )  # read and checked before the model loads
    loras = _lora_specs(args.lora)
    seed = random_seed() if args.seed is None else args.seed
    paths = _output_paths(args.output, args.prompt, seed, args.num_videos)
    _check_outputs(paths, args.overwrite)  # before any heavy work: a bad name fails in a second, not after sampling
    if args.seed is None:
        print(f"seed: {seed}", file=sys.stderr)

    from cinematic.pipeline import Pipeline

    dtype = args.dtype or ("fp16" if device.startswith("cuda") else "fp32")
    compute = args.compute or dtype
    pipe = Pipeline.from_pretrained(
        args.model,
        device=device,
        dtype=getattr(torch, DTYPES[dtype]),
        tokenizer=args.tokenizer,
        compute_dtype=getattr(torch, DTYPES[compute]),
        int8=args.int8,
        winograd=not args.no_winograd,
        loras=loras,
        merge_loras=args.lora_merge,
        compile=args.compile,
        cuda_graphs=args.cuda_graphs,
    )
    defaults = pipe.model.config.defaults
    videos = pipe(
        args.prompt,
        negative_prompt=args.negative,
        num_frames=args.frames or (None if args.init_video else defaults.frames),  # v2v: the clip's count
        height=args.height or defaults.height,
        width=args.width or defaults.width,
        steps=args.steps,
        guidance_scale=args.guidance,
        seed=seed,
        sampler=args.sampler,
        eta=args.eta,
        num_videos=args.num_videos,
        low_memory=args.low_memory,
        cache_interval=args.cache_interval,
        cache_depth=args.cache_depth,
        guidance_stop=args.guidance_stop,
        prompt_schedule=args.prompt_schedule,
        window=args.window,
        window_stride=args.window_stride,
        **pictures,
    )
    for clip, path in zip(videos if isinstance(videos, list) else [videos], paths):
        if args.fps is not None:
            clip.fps = clip.metadata["fps"] = args.fps
        print(f"wrote {clip.save(path)} (seed {clip.metadata['seed']})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cinematic", description="Text-to-video with the ModelScope text-to-video-ms-1.7b model family."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    gen = commands.add_parser("generate", help="generate a video from a text prompt")
    gen.add_argument("prompt", nargs="?", help="what the video shows, in English")
    gen.add_argument("-o", "--output", help="output file: .mp4 (default), .webm, .gif, .webp, or a folder for PNGs")
    gen.add_argument("--model", default="shapes", help="bundled name, model folder or hub id (default: shapes)")
    gen.add_argument("--negative", help="negative prompt (default: the empty prompt, as the original)")
    gen.add_argument("--frames", type=int, help="number of frames (default: the model's, 16)")
    gen.add_argument("--height", type=int, help="height in pixels, a multiple of 8 (default: the model's)")
    gen.add_argument("--width", type=int, help="width in pixels, a multiple of 8 (default: the model's)")
    gen.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    gen.add_argument("--guidance", type=float, default=9.0, help="classifier-free guidance scale (default 9)")
    gen.add_argument("--seed", type=int, help="random seed (default: drawn and printed)")
    gen.add_argument("--sampler", default="ddim", help="ddim, dpmpp_2m, dpmpp_2m_karras, euler, euler_ancestral")
    gen.add_argument("--eta", type=float, default=0.0, help="DDIM eta (default 0: deterministic)")
    gen.add_argument("--num-videos", type=int, default=1, help="videos to make; video i uses seed + i")
    gen.add_argument("--fps", type=float, help="frame rate of the file (default: the model's, 8)")
    gen.add_argument("--device", help="cpu, cuda, cuda:1, mps... (default: cuda if available)")
    gen.add_argument("--dtype", choices=sorted(DTYPES), help="weights precision (default: fp32 on CPU, fp16 on GPU)")
    gen.add_argument(
        "--compute", choices=sorted(DTYPES), help="arithmetic precision (default: --dtype); --dtype fp16 --compute "
        "fp32 keeps half-size weights and computes in fp32, for CPUs without fast half precision",
    )  # fmt: skip
    gen.add_argument(
        "--low-memory", action="store_true",
        help="run the two guidance passes one after the other, free the text encoder once the prompt is encoded, "
        "decode one frame at a time",
    )  # fmt: skip
    fast = gen.add_argument_group("fast modes (off by default; each changes the result a little)")
    fast.add_argument(
        "--cache-interval", type=int, default=1, metavar="N",
        help="feature caching: a full UNet step every N steps, the shallow levels only in between (default 1: off)",
    )  # fmt: skip
    fast.add_argument(
        "--cache-depth", type=int, default=1, metavar="D",
        help="UNet levels recomputed on cached steps, from the top (default 1)",
    )  # fmt: skip
    fast.add_argument(
        "--guidance-stop", type=float, default=1.0, metavar="F",
        help="drop the unconditional pass from this fraction of sampling on, e.g. 0.8 (default 1: never)",
    )  # fmt: skip
    fast.add_argument("--int8", action="store_true", help="int8 Linear layers in the UNet (CPU, fp32 compute)")
    fast.add_argument(
        "--no-winograd", action="store_true",
        help="PyTorch's own 3x3 convolutions instead of Winograd's (CPU, fp32 compute; same results to fp32 rounding)",
    )  # fmt: skip
    gpu = gen.add_argument_group("faster steps (same results to rounding)")
    gpu.add_argument(
        "--compile", nargs="?", const="default", metavar="MODE",
        help="run the UNet through torch.compile (MODE: default, reduce-overhead, max-autotune, "
        "max-autotune-no-cudagraphs); the first step compiles, minutes for the full model",
    )  # fmt: skip
    gpu.add_argument(
        "--cuda-graphs", action="store_true",
        help="record the UNet's step as a CUDA graph and replay it (CUDA only; not with --cache-interval or --freeu)",
    )  # fmt: skip
    start = gen.add_argument_group("starting from pictures; FreeU and FreeInit")
    start.add_argument("--init-video", metavar="CLIP", help="video-to-video: restyle or upscale this clip")
    start.add_argument(
        "--strength", type=float, metavar="S",
        help="with --init-video: how much to change it, 0 (keep) to 1 (ignore it) (default 0.6)",
    )  # fmt: skip
    start.add_argument("--init-image", metavar="IMAGE", help="animate this picture: it stays the first frame")
    start.add_argument("--loop", action="store_true", help="pin the last frame to the first (needs 2+ frames)")
    start.add_argument("--freeu", action="store_true", help="FreeU (b1=1.2, b2=1.4, s1=0.9, s2=0.2)")
    start.add_argument(
        "--freeinit", type=int, default=0, metavar="N",
        help="FreeInit: sample N more times from low-frequency re-initialised noise (default 0: off)",
    )  # fmt: skip
    long = gen.add_argument_group("long videos and prompt schedules")
    long.add_argument(
        "--prompt-schedule", metavar="SCHEDULE",
        help='prompts over time, in place of PROMPT: "0: a red circle moving right | 32: a red circle moving left"',
    )  # fmt: skip
    long.add_argument(
        "--window", type=int, metavar="W",
        help="longer clips run through the UNet in overlapping windows of W frames (default: the model's trained "
        "length, 16); 0 runs the whole clip at once",
    )  # fmt: skip
    long.add_argument(
        "--window-stride", type=int, metavar="S", help="frames between window starts (default W/2; the UNet "
        "work is about W/S times one pass's)",
    )  # fmt: skip
    gen.add_argument("--tokenizer", help="folder with vocab.json and merges.txt, for ModelScope folders without one")
    gen.add_argument(
        "--lora", action="append", default=[], metavar="PATH[:SCALE]",
        help="apply a LoRA adapter (a .safetensors file or a folder with one; cinematic's or diffusers' layout) at "
        "strength SCALE (default 1); repeat for several",
    )  # fmt: skip
    gen.add_argument("--lora-merge", action="store_true", help="fold the LoRA adapters into the weights (faster)")
    gen.add_argument("--overwrite", action="store_true", help="replace existing output files")
    gen.set_defaults(run=cmd_generate)

    from cinematic.train.cli import add_train_parser

    add_train_parser(commands)

    from cinematic.eval.cli import add_eval_parser

    add_eval_parser(commands)

    from cinematic.serve.cli import add_serve_parser

    add_serve_parser(commands)

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


def _version() -> str:
    from cinematic import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except CinematicError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; no output file was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
