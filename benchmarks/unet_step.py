"""One UNet step alone, cinematic against diffusers' ``UNet3DConditionModel``: Winograd on and off, glibc's allocator
kept and left alone. The measurements behind docs/performance.md's "Winograd convolutions on the CPU" and "The
allocator setting (Linux)".

    python benchmarks/unet_step.py --preset half --json /tmp/unet-step-half.json    # 8 frames at 128x128
    python benchmarks/unet_step.py --preset full --json /tmp/unet-step-full.json    # 16 frames at 256x256

Every case runs in a fresh process, one after the other: load the UNet of ``bench.py``'s random-weight folders in
fp32, then ``--steps`` forward passes of a guided step (a batch of two: the conditional and unconditional halves,
as diffusers batches them) at t = 999 on the same seeded inputs. Each pass is timed; the first includes first-call
costs (kernel selection) and is reported apart. The outputs are saved and compared with diffusers' in the parent
(relative error of the whole tensor). Peak RSS is the child's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.factories builds the reference models

from _bench_models import folders_complete, model_folders  # noqa: E402
from _common import GIB, machine, markdown_table, peak_rss, run_child  # noqa: E402
from load import CHILD_ENV  # noqa: E402

SIZES = {"full": (16, 256), "half": (8, 128), "tiny": (4, 64)}
# case -> (implementation, Winograd, glibc's allocator kept); the child's environment says which allocator
CASES = {
    "cinematic": ("cinematic", True, True),
    "cinematic --no-winograd": ("cinematic", False, True),
    "cinematic, glibc's defaults (CINEMATIC_MALLOC=system)": ("cinematic", True, False),
    "diffusers UNet3DConditionModel": ("diffusers", None, False),
}
SEED = 0


def child(spec: dict[str, Any]) -> None:
    import torch

    torch.set_num_threads(spec["threads"])
    if spec["keep_freed_memory"]:
        from cinematic.allocator import keep_freed_memory

        keep_freed_memory()
    folder, frames, size = Path(spec["folder"]), spec["frames"], spec["size"]
    if spec["impl"] == "cinematic":
        from cinematic.pipeline import Pipeline

        pipe = Pipeline.from_pretrained(
            folder / "cinematic", dtype=torch.float32, compute_dtype=torch.float32, winograd=spec["winograd"]
        )
        unet = pipe.model.unet
        width = pipe.model.config.unet.cross_attention_dim

        def step(x, t, context):
            return unet(x, t, context)

    else:
        from diffusers import UNet3DConditionModel

        unet = UNet3DConditionModel.from_pretrained(
            folder / "diffusers", subfolder="unet", variant="fp16", torch_dtype=torch.float32
        ).eval()
        width = unet.config.cross_attention_dim

        def step(x, t, context):
            return unet(x, t, encoder_hidden_states=context).sample

    generator = torch.Generator("cpu").manual_seed(SEED)
    x = torch.randn(2, 4, frames, size // 8, size // 8, generator=generator)  # [B,C,F,h,w], B = cond + uncond
    context = torch.randn(2, 77, width, generator=generator)
    t = torch.tensor([999, 999])
    times = []
    with torch.inference_mode():
        for _ in range(spec["steps"]):
            start = time.perf_counter()
            out = step(x, t, context)
            times.append(time.perf_counter() - start)
    torch.save(out.float(), spec["output"])
    from _common import emit

    emit({"times": times, "peak_rss": peak_rss()})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(SIZES), default="half")
    parser.add_argument("--steps", type=int, default=3, help="forward passes per process (the first is a warm-up)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads in every child")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/cinematic-bench"))
    parser.add_argument("--json", type=Path, help="write every measurement here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(json.loads(args.child))

    import torch

    model = "tiny" if args.preset == "tiny" else "full"
    folders = model_folders(args.workdir, model)
    if not folders_complete(folders, {"diffusers", "cinematic"}):
        raise SystemExit(f"no model folders under {folders['cinematic'].parent}: run benchmarks/bench.py first")
    frames, size = SIZES[args.preset]
    info = machine() | {"threads": args.threads}
    print(f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, {args.threads} threads")
    print(f"{args.preset}: one guided step (batch 2) at {frames} frames of {size}x{size}, fp32\n", flush=True)
    results = []
    for label, (impl, winograd, kept) in CASES.items():
        output = args.workdir / f"unet-step-{len(results)}.pt"
        spec = {"impl": impl, "winograd": winograd, "keep_freed_memory": kept, "steps": args.steps,
                "folder": str(folders["cinematic"].parent), "frames": frames, "size": size, "threads": args.threads,
                "output": str(output)}  # fmt: skip
        env = dict(CHILD_ENV) | ({} if kept else {"CINEMATIC_MALLOC": "system"})
        print(f"  {label} ...", end=" ", flush=True)
        result = run_child([__file__, "--child", json.dumps(spec)], env=env)
        result |= {"case": label, "output": output.name}  # in --workdir; a results file names no machine's paths
        print(" / ".join(f"{s:.2f}" for s in result["times"]) + " s", flush=True)
        results.append(result)
    reference = torch.load(args.workdir / results[-1]["output"], weights_only=True)
    for r in results:
        out = torch.load(args.workdir / r["output"], weights_only=True)
        r["relative_error_vs_diffusers"] = float((out - reference).norm() / reference.norm())
        timed = r["times"][1:] or r["times"]
        r["step_s"] = sum(timed) / len(timed)
    base = results[-1]["step_s"]
    rows = [
        [r["case"], " / ".join(f"{s:.2f}" for s in r["times"]), f"{r['step_s']:.2f}", f"{r['step_s'] / base:.2f}x",
         f"{r['peak_rss'] / GIB:.2f}", f"{r['relative_error_vs_diffusers']:.1e}"]
        for r in results
    ]  # fmt: skip
    headers = ["case", "each pass s", "mean after the first s", "vs diffusers", "peak RSS GiB", "output vs diffusers"]
    print("\n" + markdown_table(headers, rows))
    if args.json:
        payload = {"preset": args.preset, "frames": frames, "size": size, "machine": info, "steps": args.steps,
                   "results": results}  # fmt: skip
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
