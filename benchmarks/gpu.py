"""cinematic against diffusers' ``TextToVideoSDPipeline`` on one GPU, in one process, on the same random weights.

    python benchmarks/gpu.py --json /tmp/gpu-fp16.json            # the full model, fp16, 16 frames at 256x256
    python benchmarks/gpu.py --dtype bf16 --compile               # bf16, and torch.compile's rows too
    python benchmarks/gpu.py --preset tiny --device cpu           # a smoke run of the script itself

It measures, on the model folders that ``load.py`` writes (fp16 files, one set of weights in both layouts):

- the load of each pipeline onto the device;
- one guided UNet evaluation (a batch of 2: conditional and unconditional), median of ``--timed`` after a warm-up:
  diffusers (SDPA attention, its default), cinematic eager, cinematic replaying a CUDA graph, and with ``--compile``
  cinematic under ``torch.compile`` (with and without the graph); the relative error of each against diffusers'
  output on the same inputs;
- whole videos, prompt to uint8 frames: diffusers' default (DDIM 50) against cinematic at DDIM 50 and at
  DPM-Solver++ 25, eager and with CUDA graphs, and a 4-step student (a random T2V-Turbo-MS-shaped LoRA, merged).

GPU times come from ``torch.cuda.synchronize`` around each call. bench.py remains the CPU harness (every case in a
fresh process, peak RSS, FLOPs); on a GPU the step is milliseconds and one process keeps the comparison within one
lease of the card.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.test_fewstep_unet makes the student's LoRA

from _bench_cases import _sync  # noqa: E402
from _common import markdown_table  # noqa: E402

PROMPT = "an astronaut riding a horse on the moon"
DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def timed(fn: Callable[[], Any], device, repeats: int, warmup: int = 1) -> dict[str, Any]:
    """Median and minimum seconds of ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "times": times}


def relative_error(a, b) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=["full", "tiny"], default="full")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16", help="weights and compute (default fp16)")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--timed", type=int, default=20, help="timed UNet evaluations per row (default 20)")
    parser.add_argument("--videos", type=int, default=2, help="timed whole videos per row (default 2)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (slow to compile)")
    parser.add_argument("--no-videos", action="store_true", help="UNet rows only")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/cinematic-bench"))
    parser.add_argument("--json", type=Path, help="write every measurement here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch
    from diffusers import TextToVideoSDPipeline
    from load import make_models

    from cinematic.pipeline import Pipeline

    device, dtype = torch.device(args.device), getattr(torch, DTYPES[args.dtype])
    on_cuda = device.type == "cuda"
    info: dict[str, Any] = {"torch": torch.__version__, "device": str(device), "dtype": args.dtype}
    if on_cuda:
        info["gpu"] = torch.cuda.get_device_name(device)
    print(f"{info}, {args.frames} frames at {args.size}x{args.size}, guidance 9", flush=True)
    folders = make_models(args.preset, args.workdir, rebuild=False)
    out: dict[str, Any] = {"info": info, "settings": {k: str(v) for k, v in vars(args).items()}}

    start = time.perf_counter()
    theirs = TextToVideoSDPipeline.from_pretrained(folders["diffusers"], torch_dtype=dtype, variant="fp16").to(device)
    _sync(device)
    out["load_s"] = {"diffusers": time.perf_counter() - start}
    theirs.set_progress_bar_config(disable=True)
    start = time.perf_counter()
    ours = Pipeline.from_pretrained(folders["cinematic"], device=device, dtype=dtype)
    _sync(device)
    out["load_s"]["cinematic"] = time.perf_counter() - start
    print(f"loaded: {out['load_s']}", flush=True)

    out["unet"] = unet_rows(args, theirs, ours, device)
    print_unet(out["unet"])
    save(args, out)
    if not args.no_videos:
        out["videos"] = video_rows(args, theirs, ours, device)
        print("\nwhole video, prompt to uint8 frames (load excluded)\n")
        reference = out["videos"][0]["median_s"]
        rows = [[r["name"], f"{r['median_s']:.3f}", f"{r['min_s']:.3f}", f"{reference / r['median_s']:.2f}x",
                 f"{r['peak_gib']:.2f}" if r.get("peak_gib") is not None else "-"] for r in out["videos"]]  # fmt: skip
        print(markdown_table(["setting", "median s", "min s", "speed-up vs diffusers", "GPU peak GiB"], rows))
        save(args, out)
    if args.compile:  # last: compiling the full UNet takes minutes
        out["unet"] = unet_rows(args, theirs, ours, device, compile=True, done=out["unet"])
        print_unet(out["unet"])
        save(args, out)


def save(args: argparse.Namespace, out: dict[str, Any]) -> None:
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
        print(f"\nwrote {args.json}", flush=True)


def print_unet(rows: list[dict[str, Any]]) -> None:
    print("\none guided UNet evaluation (batch 2)\n")
    reference = rows[0]["median_s"]
    table = [[r["name"], f"{1000 * r['median_s']:.2f}", f"{1000 * r['min_s']:.2f}", f"{r['median_s'] / reference:.2f}x",
              f"{r['rel_error']:.1e}" if r.get("rel_error") is not None else "-"]
             for r in rows if "error" not in r]  # fmt: skip
    print(markdown_table(["implementation", "median ms", "min ms", "vs diffusers", "rel. error vs diffusers"], table))
    for r in rows:
        if "error" in r:
            print(f"{r['name']}: {r['error'].splitlines()[0][:300]}")


def unet_rows(args, theirs, ours, device, compile: bool = False, done: list | None = None) -> list[dict[str, Any]]:
    """Without ``compile``: diffusers, cinematic eager and with a CUDA graph. With it: the same first row again (the
    reference output), then the torch.compile rows, appended to ``done``."""
    import torch

    dtype = ours.model.unet.dtype

    generator = torch.Generator("cpu").manual_seed(0)
    f, h = args.frames, args.size // 8
    x = torch.randn(2, 4, f, h, h, generator=generator).to(device, dtype)
    t = torch.tensor([500.0, 500.0], device=device)
    context = torch.randn(2, 77, ours.model.config.unet.cross_attention_dim, generator=generator).to(device, dtype)
    unet = ours.model.unet
    rows = []

    def add(name: str, fn: Callable[[], torch.Tensor], warmup: int = 2) -> None:
        try:
            with torch.inference_mode():
                result = fn()
                row = {"name": name} | timed(fn, device, args.timed, warmup)
        except Exception as error:  # a row that cannot run on this device or torch is reported, not fatal
            print(f"  {name}: failed: {type(error).__name__}: {str(error).splitlines()[0][:300]}", flush=True)
            rows.append({"name": name, "error": f"{type(error).__name__}: {error}"[:2000]})
            return
        row["rel_error"] = None if not rows else relative_error(result, rows[0]["output"])
        row["output"] = result.float()
        rows.append(row)
        print(f"  {name}: {1000 * row['median_s']:.2f} ms (rel. error {row['rel_error']})", flush=True)

    from cinematic.models.cuda_graphs import CUDAGraphs

    add("diffusers UNet3DConditionModel (SDPA)", lambda: theirs.unet(x, t, encoder_hidden_states=context).sample)
    if not compile:
        add("cinematic, eager", lambda: unet(x, t, context))
        if device.type == "cuda":
            graphed = CUDAGraphs(unet)
            add("cinematic, CUDA graph", lambda: graphed(x, t, context))
            convs = [m for m in unet.modules() if isinstance(m, torch.nn.Conv2d)]
            for conv in convs:  # an experiment: the 2-D convolutions' weights NHWC
                conv.to(memory_format=torch.channels_last)
            channels_last = CUDAGraphs(unet)
            add("cinematic, CUDA graph, channels-last conv weights", lambda: channels_last(x, t, context))
            for conv in convs:
                conv.to(memory_format=torch.contiguous_format)
    else:
        start = time.perf_counter()
        compiled = torch.compile(unet, dynamic=False)
        add("cinematic, torch.compile", lambda: compiled(x, t, context), warmup=3)
        if len(rows) > 1 and "error" not in rows[-1]:
            rows[-1]["compile_and_warmup_s"] = time.perf_counter() - start
        if device.type == "cuda":
            both = CUDAGraphs(compiled)
            add("cinematic, torch.compile + CUDA graph", lambda: both(x, t, context))
        rows = [*(done or rows[:1]), *rows[1:]]
    for row in rows:
        row.pop("output", None)
    return [r for r in rows if "error" not in r] + [r for r in rows if "error" in r]


def video_rows(args, theirs, ours, device) -> list[dict[str, Any]]:
    import torch

    size = dict(num_frames=args.frames, height=args.size, width=args.size, guidance_scale=9.0)
    rows = []

    def add(name: str, fn: Callable[[int], Any], steps: int) -> None:
        try:
            fn(5)  # warm-up: kernel choice, and the graphs' recording (guidance stop 0.8 leaves 1 of 5 unguided)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            row = {"name": name, "steps": steps} | timed(lambda: fn(steps), device, args.videos, warmup=0)
        except Exception as error:
            print(f"  {name}: failed: {type(error).__name__}: {str(error).splitlines()[0][:300]}", flush=True)
            return
        if device.type == "cuda":
            row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        rows.append(row)
        print(f"  {name}: {row['median_s']:.3f} s", flush=True)

    def diffusers_video(steps: int):
        generator = torch.Generator("cpu").manual_seed(0)
        return theirs(PROMPT, num_inference_steps=steps, generator=generator, output_type="np", **size).frames

    def ours_video(steps: int, sampler: str, **fast):
        return ours(PROMPT, steps=steps, sampler=sampler, seed=0, progress=False, **size, **fast)

    add("diffusers, DDIM 50", diffusers_video, 50)
    add("cinematic, DDIM 50", lambda n: ours_video(n, "ddim"), 50)
    add("cinematic, DPM-Solver++ 25", lambda n: ours_video(n, "dpmpp_2m"), 25)
    if device.type == "cuda":
        ours.accelerate(cuda_graphs=True)
        add("cinematic, DDIM 50, CUDA graphs", lambda n: ours_video(n, "ddim"), 50)
        add("cinematic, DPM-Solver++ 25, CUDA graphs", lambda n: ours_video(n, "dpmpp_2m"), 25)
        add(
            "cinematic, DPM-Solver++ 25, CUDA graphs, guidance stop 0.8",
            lambda n: ours_video(n, "dpmpp_2m", guidance_stop=0.8),
            25,
        )
        ours.accelerate()
    # A 4-step student (issue 24): a random T2V-Turbo-MS-shaped list merged into the weights, sampled as loaded (lcm,
    # one pass per step, guidance 9 as the embedding's input). Last, since it changes the pipeline's weights.
    from _bench_cases import _merge_random_turbo_lora

    _merge_random_turbo_lora(ours)
    add("cinematic, 4-step student (lcm)", lambda n: ours(PROMPT, steps=n, seed=0, progress=False, **size), 4)
    if device.type == "cuda":
        ours.accelerate(cuda_graphs=True)
        add("cinematic, 4-step student (lcm), CUDA graphs", lambda n: ours(PROMPT, steps=n, seed=0, progress=False,
                                                                         **size), 4)  # fmt: skip
        ours.accelerate()
    return rows


if __name__ == "__main__":
    main()
