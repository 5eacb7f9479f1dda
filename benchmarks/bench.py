"""Speed and memory of a whole text-to-video generation: cinematic against diffusers' ``TextToVideoSDPipeline`` and
the ModelScope original (``UNetSD`` in its own ``ddim_sample_loop``), same random weights and inputs, one run.

    python benchmarks/bench.py --preset tiny                                    # smoke run, a few minutes
    python benchmarks/bench.py --preset half --json /tmp/bench-half.json       # full width, 8 frames at 128x128
    python benchmarks/bench.py --preset full --json /tmp/bench-full.json       # 16 frames at 256x256

Every case runs in a fresh process (``_common.run_child``): a whole generation (load, encode, ``1 + --timed`` DDIM
steps with guidance 9, decode all frames) whose peak RSS is the process's; or a load alone from one format. The
first run writes the model folders (``_bench_models``): one set of random weights in the diffusers, cinematic and
ModelScope layouts. See benchmarks/README.md for the columns.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.factories builds the reference models

from _bench_cases import JUDGE_MODES  # noqa: E402
from _bench_models import folders_complete, model_folders  # noqa: E402
from _common import GIB, machine, markdown_table, median, run_child  # noqa: E402
from load import CHILD_ENV  # noqa: E402

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


@dataclass(frozen=True)
class Setting:
    model: str  # "full" (the published configs) or "tiny"
    frames: int
    size: int  # pixels, height = width
    timed: int  # timed steps after the warm-up step (cycles, for feature caching)


SETTINGS = {
    "full": Setting("full", 16, 256, 3),
    "half": Setting("full", 8, 128, 3),
    "tiny": Setting("tiny", 4, 64, 4),
}

# cinematic's cases: label -> settings read by _bench_cases.cinematic_generation
FP32 = "--dtype fp32 (the default before 22)"  # fp32 weights from the cinematic folder, guidance batched
DEFAULT = "default (fp16 files kept, fp32 compute, plan by size)"  # `cinematic generate --model FOLDER`, no flags
FEW_STEP = "4-step student (T2V-Turbo LoRA merged, lcm, one pass per step)"
CINEMATIC_MODES = {
    DEFAULT: {"defaults": True},
    FP32: {},
    "--dtype fp16 --compute fp32": {"storage": "float16"},
    "--low-memory --dtype fp16 --compute fp32": {"storage": "float16", "low_memory": True},
    "--cache-interval 3": {"cache_interval": 3},
    "one conditional pass (a truncated step)": {"guidance": 1.0},
    "--int8": {"int8": True},
    "--no-winograd": {"winograd": False},
    # A T2V-Turbo-MS-shaped student: a random rank-32 list over every layer, merged (`--lora unet_lora.pt
    # --lora-merge`), sampled as it is by default: lcm, one pass per step, guidance as the embedding's input.
    FEW_STEP: {"defaults": True, "few_step": True},
}
# --modes names for them
MODE_NAMES = dict(
    zip(
        ["default", "fp32", "fp16", "low-memory", "cache", "truncated", "int8", "no-winograd", "few-step"],
        CINEMATIC_MODES,
        strict=True,
    )
)
PEERS = {
    "diffusers": "TextToVideoSDPipeline 0.42, batched guidance",
    "modelscope": "UNetSD + ddim_sample_loop, 2 passes/step",
}
# (loader, layout, variant, storage): every loader from every format it reads; storage "float16" keeps the weights
# as the files hold them and computes in the run's dtype (``--dtype fp16 --compute fp32``)
# storage "default": no dtype named, the library's choice (as `cinematic generate` loads)
LOADS = [
    ("cinematic", "cinematic", None, "default"),
    ("cinematic", "diffusers", "fp16", "default"),
    ("cinematic", "cinematic", None, None),
    ("cinematic", "cinematic", None, "float16"),
    ("cinematic", "diffusers", "fp16", None),
    ("cinematic", "modelscope", None, None),
    ("diffusers", "diffusers", "fp16", None),
    ("modelscope", "modelscope", None, None),
]


# ---------------------------------------------------------------------------------------------------------------------
# Running the cases.


class Runner:
    def __init__(self, args: argparse.Namespace, folders: dict[str, Path]):
        self.args, self.folders = args, folders
        self.env = dict(CHILD_ENV)
        if args.threads is not None:
            self.env["OMP_NUM_THREADS"] = str(args.threads)
        self.base = {"threads": args.threads or _default_threads(), "device": args.device, "dtype": DTYPES[args.dtype]}

    def child(self, kind: str, **spec: Any) -> dict[str, Any]:
        payload = json.dumps({"kind": kind, **self.base, **spec})
        try:
            return run_child([__file__, "--child", payload], env=self.env)
        except RuntimeError as error:
            print(f"\n  FAILED: {str(error).splitlines()[-1]}", flush=True)
            return {"error": str(error)}

    def loads(self) -> list[dict[str, Any]]:
        results = []
        for loader, layout, variant, storage in LOADS:
            if loader not in self.args.impls and loader != "cinematic":
                continue
            if layout == "modelscope" and "modelscope" not in self.args.impls:  # its folder is made only then
                continue
            kept = f", {storage} kept" if storage else ""
            print(f"  load: {loader} from {layout}{kept} ...", end=" ", flush=True)
            spec = {"loader": loader, "folder": str(self.folders[layout]), "variant": variant, "model": self.model}
            spec |= {"storage": storage} if storage else {}
            self.child("load", **spec)  # warm-up: the files are in the page cache from now on
            runs = [self.child("load", **spec) for _ in range(self.args.load_repeats)]
            ok = [r for r in runs if "error" not in r]
            result = {"loader": loader, "layout": layout, "variant": variant, "storage": storage, "runs": runs}
            if ok:
                result |= {key: median([r[key] for r in ok]) for key in ("load_s", "peak_delta", "weights_bytes")}
                print(f"{result['load_s']:.2f} s", flush=True)
            results.append(result)
        return results

    @property
    def model(self) -> str:
        return SETTINGS[self.args.preset].model

    def generations(self, setting: Setting, context: Path) -> list[dict[str, Any]]:
        common = {"frames": setting.frames, "size": setting.size, "timed": self.args.timed or setting.timed}
        cases = []
        if "cinematic" in self.args.impls:
            for label, mode in CINEMATIC_MODES.items():
                if label not in self.modes():
                    continue
                spec = {"impl": "cinematic", "folder": str(self.folders["cinematic"]), "mode": mode}
                if label == DEFAULT:  # from the published fp16 files, as a user of them runs it
                    spec |= {"folder": str(self.folders["diffusers"]), "variant": "fp16"}
                if label == FP32:
                    spec["save_context"] = str(context)
                cases.append(("cinematic", label, spec))
        for impl in ("diffusers", "modelscope"):
            if impl in self.args.impls:
                spec = {"impl": impl, "folder": str(self.folders[impl]), "context": str(context), "model": self.model}
                cases.append((impl, PEERS[impl], spec))
        results = []
        for impl, label, spec in cases:
            print(f"  generation: {impl} {label} ...", end=" ", flush=True)
            start = time.perf_counter()
            result = {"impl": impl, "mode": label, **self.child("generation", **common, **spec)}
            if "step_s" in result:
                print(f"{result['step_s']:.3f} s/step ({time.perf_counter() - start:.0f} s)", flush=True)
            results.append(result)
        return results

    def first_steps(self, setting: Setting) -> list[dict[str, Any]]:
        """Time to first step of a whole default generation, cinematic's defaults against diffusers' fp32 pipeline,
        both from the published fp16 files (each in a fresh process, median of --load-repeats after a warm-up)."""
        results = []
        for impl in ("cinematic", "diffusers"):
            if impl not in self.args.impls:
                continue
            print(f"  time to first step: {impl} ...", end=" ", flush=True)
            spec = {"impl": impl, "folder": str(self.folders["diffusers"]), "variant": "fp16",
                    "frames": setting.frames, "size": setting.size}  # fmt: skip
            self.child("first_step", **spec)  # warm-up
            runs = [self.child("first_step", **spec) for _ in range(self.args.load_repeats)]
            ok = [r for r in runs if "error" not in r]
            result = {"impl": impl, "runs": runs}
            if ok:
                result |= {key: median([r[key] for r in ok]) for key in ("load_s", "first_step_s")}
                print(f"{result['first_step_s']:.2f} s", flush=True)
            results.append(result)
        return results

    def modes(self) -> list[str]:
        """cinematic's modes that apply: fp16 storage only under fp32 compute, int8 only on the CPU in fp32."""
        labels = list(CINEMATIC_MODES)
        if self.args.dtype != "fp32":
            labels.remove(DEFAULT)  # the defaults compute in fp32 on a CPU
            labels.remove("--dtype fp16 --compute fp32")
            labels.remove("--low-memory --dtype fp16 --compute fp32")
        if self.args.dtype != "fp32" or self.args.device != "cpu":
            labels.remove("--int8")
            labels.remove("--no-winograd")
        if self.args.modes:  # the fp32 mode always runs: it writes the peers' prompt features
            wanted = {MODE_NAMES[name] for name in self.args.modes} | {FP32}
            labels = [label for label in labels if label in wanted]
        return labels


def _default_threads() -> int:
    import torch

    return torch.get_num_threads()


# ---------------------------------------------------------------------------------------------------------------------
# Tables.


def _ratio(value: float | None, reference: float | None) -> str:
    return f"{value / reference:.2f}x" if value and reference else "-"


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def generation_table(results: list[dict[str, Any]], peak_gflops: float | None) -> str:
    ok = [r for r in results if "step_s" in r]
    peers = {r["impl"]: r for r in ok if r["impl"] != "cinematic"}
    d, m = peers.get("diffusers", {}), peers.get("modelscope", {})
    headers = [
        "implementation", "mode", "encode s", "s/step", "decode s", "peak RSS GiB", "peak in", "GFLOP/step", "GFLOP/s",
        "% of matmul peak", "step vs diffusers", "step vs modelscope", "RSS vs diffusers", "RSS vs modelscope",
    ]  # fmt: skip
    rows = []
    for r in results:
        if "step_s" not in r:
            rows.append([r["impl"], r["mode"], *["failed"] + ["-"] * (len(headers) - 3)])
            continue
        gflops = r["flops_per_step"] / r["step_s"] / 1e9
        rows.append([
            r["impl"], r["mode"], _fmt(r["encode_s"], ".3f"), f"{r['step_s']:.3f}", f"{r['decode_s']:.3f}",
            f"{r['peak_rss'] / GIB:.3f}", max(r["phase_peaks"], key=r["phase_peaks"].get),
            f"{r['flops_per_step'] / 1e9:.4g}", f"{gflops:.1f}",
            f"{100 * gflops / peak_gflops:.0f}%" if peak_gflops else "-",
            _ratio(r["step_s"], d.get("step_s")), _ratio(r["step_s"], m.get("step_s")),
            _ratio(r["peak_rss"], d.get("peak_rss")), _ratio(r["peak_rss"], m.get("peak_rss")),
        ])  # fmt: skip
    if any("cuda_peak_allocated" in r for r in ok):  # on a GPU, its memory too
        headers.insert(6, "GPU peak GiB")
        for row, r in zip(rows, results):
            row.insert(6, f"{r['cuda_peak_allocated'] / GIB:.3f}" if "cuda_peak_allocated" in r else "-")
    return markdown_table(headers, rows)


def first_step_table(results: list[dict[str, Any]]) -> str:
    reference = next((r.get("first_step_s") for r in results if r["impl"] == "diffusers"), None)
    rows = [
        [r["impl"], _fmt(r.get("load_s"), ".2f"), _fmt(r.get("first_step_s"), ".2f"),
         _ratio(r.get("first_step_s"), reference)]
        for r in results
    ]  # fmt: skip
    return markdown_table(["implementation", "load s", "time to first step s", "vs diffusers"], rows)


def load_table(results: list[dict[str, Any]]) -> str:
    native = {r["loader"]: r.get("load_s") for r in results if r["loader"] == r["layout"] and not r.get("storage")}
    headers = ["loader", "files", "load+touch s", "weights GiB", "peak Δ GiB", "vs diffusers", "vs modelscope"]
    rows = []
    for r in results:
        files = r["layout"] + (f" ({r['variant']})" if r["variant"] else "")
        if r.get("storage") == "default":
            files += ", the library's default dtypes"
        elif r.get("storage"):
            files += f", weights kept in {r['storage']}"
        if "load_s" not in r:
            rows.append([r["loader"], files, "failed", "-", "-", "-", "-"])
            continue
        rows.append([
            r["loader"], files, f"{r['load_s']:.2f}", f"{r['weights_bytes'] / GIB:.3f}", f"{r['peak_delta'] / GIB:.3f}",
            _ratio(r["load_s"], native.get("diffusers")), _ratio(r["load_s"], native.get("modelscope")),
        ])  # fmt: skip
    return markdown_table(headers, rows)


def estimates(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Whole-video seconds (encode + steps + decode, load excluded) of the usual settings, from the measured costs.

    Guidance truncation at 0.8 of 25 steps: 20 guided steps and 5 conditional-only ones; combined with caching, the
    conditional-only steps are assumed to save what caching saves on guided ones.
    """
    by = {(r["impl"], r["mode"]): r for r in results if "step_s" in r}
    rows = []

    def add(name: str, case: dict | None, steps_s: float) -> None:
        seconds = (case["encode_s"] or 0) + steps_s + case["decode_s"]
        rows.append({"setting": name, "seconds": seconds, "encode_included": case["encode_s"] is not None})

    for impl in ("diffusers", "modelscope"):
        if peer := by.get((impl, PEERS[impl])):
            add(f"{impl}, DDIM 50" + ("" if peer["encode_s"] is not None else " (no text encoding)"), peer,
                50 * peer["step_s"])  # fmt: skip
    plain = by.get(("cinematic", DEFAULT)) or by.get(("cinematic", FP32))
    lean = by.get(("cinematic", "--low-memory --dtype fp16 --compute fp32"))
    cached = by.get(("cinematic", "--cache-interval 3"))
    cond = by.get(("cinematic", "one conditional pass (a truncated step)"))
    if plain:
        add("cinematic, DDIM 50", plain, 50 * plain["step_s"])
        add("cinematic, DPM-Solver++ 25", plain, 25 * plain["step_s"])
    if lean:
        add("cinematic --low-memory --dtype fp16 --compute fp32, DPM-Solver++ 25", lean, 25 * lean["step_s"])
    if plain and cond:
        add("cinematic, DPM-Solver++ 25 --guidance-stop 0.8", plain, 20 * plain["step_s"] + 5 * cond["step_s"])
    if cached:
        add("cinematic, DPM-Solver++ 25 --cache-interval 3", cached, 25 * cached["step_s"])
    if few := by.get(("cinematic", FEW_STEP)):
        add("cinematic, 4-step student (lcm)", few, 4 * few["step_s"])
    if plain and cached and cond:
        saving = cached["step_s"] / plain["step_s"]
        steps_s = 20 * cached["step_s"] + 5 * cond["step_s"] * saving
        add("cinematic, DPM-Solver++ 25 --cache-interval 3 --guidance-stop 0.8", plain, steps_s)
    return rows


def estimate_table(rows: list[dict[str, Any]]) -> str:
    ref = {r["setting"].split(",")[0]: r["seconds"] for r in rows if "DDIM 50" in r["setting"]}
    headers = ["setting", "whole video s (estimated)", "speed-up vs diffusers DDIM 50", "speed-up vs modelscope"]
    body = [
        [r["setting"], f"{r['seconds']:.2f}", _ratio(ref.get("diffusers"), r["seconds"]),
         _ratio(ref.get("modelscope"), r["seconds"])]
        for r in rows
    ]  # fmt: skip
    return markdown_table(headers, body)


def quality_table(result: dict[str, Any]) -> str:
    rows = [
        [name, str(r["steps"]), f"{r['seconds']:.2f}", r["against"] or "-", _fmt(r["relative_error"], ".4f")]
        for name, r in result["modes"].items()
    ]
    return markdown_table(["mode", "steps", "sampling s", "against", "relative error of final latents"], rows)


def judge_table(result: dict[str, Any]) -> str:
    modes = result["modes"]
    reference = modes.get("ddim 50", {}).get("all")
    rows = []
    for name, r in modes.items():
        delta = f"{100 * (r['all'] - reference):+.1f}" if reference is not None else "-"
        rows.append([name, f"{100 * r['all']:.1f}%", f"{100 * r['seen_all']:.1f}%", f"{100 * r['held_out_all']:.1f}%",
                     delta, f"{r['seconds_per_video']:.2f}"])  # fmt: skip
    headers = ["setting", "all correct", "seen", "held out", "points vs DDIM 50", "s per video (batched)"]
    return markdown_table(headers, rows)


# ---------------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(SETTINGS), default="tiny")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="compute dtype (default fp32)")
    parser.add_argument("--threads", type=int, help="torch threads in every child (default: torch's default)")
    parser.add_argument("--timed", type=int, help="timed steps (cycles) after the warm-up (default: the preset's)")
    parser.add_argument("--load-repeats", type=int, default=2, help="timed loads per format, after a warm-up")
    parser.add_argument("--impls", nargs="+", default=["cinematic", "diffusers", "modelscope"],
                        choices=["cinematic", "diffusers", "modelscope"])  # fmt: skip
    parser.add_argument("--modes", nargs="+", choices=list(MODE_NAMES), help="cinematic's modes to run (default all)")
    parser.add_argument("--no-loads", action="store_true", help="skip the load-time table")
    parser.add_argument("--no-generations", action="store_true", help="skip the generations (loads only)")
    parser.add_argument("--no-first-step", action="store_true", help="skip the time-to-first-step cases")
    parser.add_argument("--quality", action="store_true", help="also measure each fast mode's error (whole runs)")
    parser.add_argument("--quality-steps", type=int, default=25, help="DPM-Solver++ steps of --quality (default 25)")
    parser.add_argument("--reference-steps", type=int, default=50, help="DDIM steps of --quality's reference")
    parser.add_argument("--judge", type=int, metavar="SEEDS", help="also judge the shapes model per fast mode")
    parser.add_argument("--judge-settings", nargs="+", choices=list(JUDGE_MODES), metavar="SETTING",
                        help=f"what --judge runs (default all: {', '.join(map(repr, JUDGE_MODES))})")  # fmt: skip
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/cinematic-bench"))
    parser.add_argument("--rebuild", action="store_true", help="write the model folders again")
    parser.add_argument("--json", type=Path, help="write every measurement here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        from _bench_cases import CHILDREN

        spec = json.loads(args.child)
        return CHILDREN[spec["kind"]](spec)

    setting = SETTINGS[args.preset]
    folders = model_folders(args.workdir, setting.model)
    if args.rebuild:
        for folder in folders.values():
            shutil.rmtree(folder, ignore_errors=True)
    runner = Runner(args, folders)
    layouts = {"diffusers", "cinematic"} | ({"modelscope"} & set(args.impls))  # what this run reads
    if not folders_complete(folders, layouts):
        print(f"writing the {setting.model} random-weight model folders under {folders['cinematic'].parent} ...")
        result = runner.child("make", model=setting.model, workdir=str(args.workdir), layouts=sorted(layouts))
        if "error" in result:
            raise SystemExit(result["error"])

    info = machine() | {"threads": runner.base["threads"], "device": args.device}
    if args.device == "cuda":
        import torch

        info["gpu"] = torch.cuda.get_device_name()
    gpu = f" ({info['gpu']})" if "gpu" in info else ""
    print(f"machine: {info['cpu']}, {info['cores']} cores, {info.get('ram_gib', '?')} GiB RAM, torch {info['torch']}, "
          f"{runner.base['threads']} threads, {args.device}{gpu}")  # fmt: skip
    print(f"preset {args.preset}: {asdict(setting)}, compute {args.dtype}\n", flush=True)

    peak = runner.child("matmul").get("gflops")
    print(f"  {args.dtype} matmul peak: {_fmt(peak, '.1f')} GFLOP/s", flush=True)
    loads = [] if args.no_loads else runner.loads()
    context = args.workdir / f"context-{args.preset}.pt"
    generations = [] if args.no_generations else runner.generations(setting, context)
    first = [] if args.no_first_step else runner.first_steps(setting)
    rows = estimates(generations)
    quality = judge = None
    if args.quality:
        print("  quality ...", flush=True)
        quality = runner.child("quality", folder=str(folders["cinematic"]), frames=setting.frames, size=setting.size,
                               steps=args.quality_steps, reference_steps=args.reference_steps)  # fmt: skip
    if args.judge:
        print("  shapes judge ...", flush=True)
        judge = runner.child("judge", seeds=args.judge, settings=args.judge_settings)

    timed = args.timed or setting.timed
    print(f"\n{setting.frames} frames at {setting.size}x{setting.size}, guidance 9, compute {args.dtype}; s/step: "
          f"median of {timed} after 1 warm-up (cycles of 3 steps for --cache-interval 3)\n")  # fmt: skip
    if generations:
        print(generation_table(generations, peak))
    if loads:
        repeats = args.load_repeats
        print(f"\nload (each in a fresh process, median of {repeats} after a warm-up, weights in {args.dtype})\n")
        print(load_table(loads))
    if first:
        print(
            "\ntime to first step: from the load call to the first UNet pass of a default generation (fresh "
            "processes, fp16 files in the page cache)\n"
        )
        print(first_step_table(first))
    if rows:
        print("\nwhole video from the measured costs (load excluded)\n")
        print(estimate_table(rows))
    if quality and "modes" in quality:
        print(f"\nquality on this preset's model, {setting.frames} frames at {setting.size}x{setting.size}\n")
        print(quality_table(quality))
    if judge and "modes" in judge:
        print(f"\nshapes model, {args.judge} seed(s) per caption, cinematic.eval's judge\n")
        print(judge_table(judge))
    if args.json:
        payload = {"preset": args.preset, "setting": asdict(setting), "settings": _jsonable(vars(args)),
                   "machine": info, "matmul_gflops": peak, "loads": loads, "generations": generations,
                   "first_steps": first, "estimates": rows, "quality": quality, "judge": judge}  # fmt: skip
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"\nwrote {args.json}")


def _jsonable(values: dict[str, Any]) -> dict[str, Any]:
    """The arguments as JSON; paths by their names only: a results file is read on other machines."""
    return {k: v.name if isinstance(v, Path) else v for k, v in values.items() if k != "child"}


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
