"""The ``cinematic`` command. It only parses arguments and calls the library; heavy imports happen per command."""

from __future__ import annotations

import argparse
import sys

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cinematic", description="Text-to-video with the ModelScope text-to-video-ms-1.7b model family."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

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
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
