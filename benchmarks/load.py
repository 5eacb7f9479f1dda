"""Load time and peak memory: cinematic's ``load`` against diffusers' ``TextToVideoSDPipeline.from_pretrained``.

    python benchmarks/load.py --preset tiny          # a smoke run: ~3 min, ~1 with --repeats 1
    python benchmarks/load.py --preset full --json load.json

The first run writes a random-weight model of the preset's size (once, cached under ``--workdir``) in two layouts:
diffusers' (``save_pretrained`` of diffusers' and transformers' own classes, fp16 weights as ``variant="fp16"``, like
the published download) and cinematic's (``cinematic.weights.convert`` of it, fp16). Each load then runs in a fresh
process that reports:

- load s: wall clock of the load call alone (median of ``--repeats``, after one discarded warm-up run per case, so
  the files are in the page cache);
- touch s: reading one element per page of every weight after the load. Safetensors files are memory-mapped, and
  a weight that keeps the file's dtype stays a view of the file, whose pages are read (and count in RSS) on first
  use; so the load alone can look free. load + touch is the time to weights that are all in memory;
- weights: numel x element size of the loaded parameters and buffers;
- RSS after ``import torch``, and before the load (torch and the loader imported): the baseline;
- peak: ``ru_maxrss`` at the end of the child (load and touch), as a delta over the baseline and as a ratio to the
  weights. mmap'd file pages count in RSS while mapped and touched, like any other memory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from _common import (
    GIB,
    MIB,
    current_rss,
    emit,
    machine,
    markdown_table,
    median,
    peak_rss,
    run_child,
    tensor_bytes,
    touch,
)

ROOT = Path(__file__).resolve().parent.parent
TARGET = 1.3  # the bound on our peak RSS delta over the weights in memory
CHILD_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "DIFFUSERS_VERBOSITY": "error",
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONWARNINGS": "ignore",
}

# (label, loader, layout, dtype, variant)
CASES = [
    ("cinematic", "cinematic", "cinematic", "float16", None),
    ("cinematic", "cinematic", "cinematic", "float32", None),
    ("cinematic", "cinematic", "diffusers", "float16", "fp16"),
    ("cinematic", "cinematic", "diffusers", "float32", "fp16"),
    ("diffusers", "diffusers", "diffusers", "float16", "fp16"),
    ("diffusers", "diffusers", "diffusers", "float32", "fp16"),
]


# ---------------------------------------------------------------------------------------------------------------------
# Making the model folders (in a child process, so the parent stays small while it measures).


def diffusers_kwargs(preset: str | Any) -> dict[str, dict[str, Any]]:
    """Constructor arguments of diffusers' and transformers' classes for a cinematic preset name or ``ModelConfig``
    (``full`` gives the published text-to-video-ms-1.7b configs)."""
    from cinematic.models.presets import PRESETS

    config = PRESETS[preset] if isinstance(preset, str) else preset
    u, t, v = config.unet, config.text_encoder, config.vae
    down = ["CrossAttnDownBlock3D" if level.attention else "DownBlock3D" for level in u.levels]
    unet = dict(
        sample_size=32,
        in_channels=u.in_channels,
        out_channels=u.out_channels,
        down_block_types=tuple(down),
        up_block_types=tuple(d.replace("Down", "Up") for d in reversed(down)),
        block_out_channels=tuple(level.channels for level in u.levels),
        layers_per_block=u.layers_per_block,
        norm_num_groups=u.norm_groups,
        norm_eps=u.norm_eps,
        cross_attention_dim=u.cross_attention_dim,
        attention_head_dim=u.head_dim,
    )
    vae = dict(
        in_channels=v.in_channels,
        out_channels=v.out_channels,
        down_block_types=("DownEncoderBlock2D",) * len(v.block_out_channels),
        up_block_types=("UpDecoderBlock2D",) * len(v.block_out_channels),
        block_out_channels=tuple(v.block_out_channels),
        layers_per_block=v.layers_per_block,
        latent_channels=v.latent_channels,
        norm_num_groups=v.norm_groups,
        sample_size=256,
        scaling_factor=v.scaling_factor,
    )
    text = dict(
        vocab_size=t.vocab_size,
        hidden_size=t.width,
        intermediate_size=t.mlp_width,
        num_hidden_layers=t.layers,
        num_attention_heads=t.heads,
        max_position_embeddings=t.context_length,
        layer_norm_eps=t.eps,
        hidden_act="gelu",
        projection_dim=512,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )
    return {"unet": unet, "vae": vae, "text_encoder": text}


def random_fp16(build, seed: int):
    """Build a network on the meta device (no memory, no init), then give it fp16 storage filled with small
    uniform noise: seconds, where the libraries' own random init of the full model takes minutes."""
    import torch

    with torch.device("meta"):
        module = build()
    module = module.to(torch.float16).to_empty(device="cpu")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.uniform_(-0.03, 0.03, generator=generator)
        for name, b in module.named_buffers():
            if b.is_floating_point():
                b.zero_()
            elif name.endswith("position_ids"):  # CLIP's non-persistent arange
                b.copy_(torch.arange(b.shape[-1]).expand_as(b))
    return module.eval()


def make_diffusers_folder(preset: str | Any, dst: Path) -> None:
    """A ``TextToVideoSDPipeline`` folder with fp16 weights, written by the libraries' own ``save_pretrained``."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, TextToVideoSDPipeline, UNet3DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    sys.path.insert(0, str(ROOT))
    from tests.clip_vocab import write_tiny_clip_vocab
    from tests.factories import SCHEDULER_CONFIG

    kwargs = diffusers_kwargs(preset)
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    vocab = write_tiny_clip_vocab(tmp.with_name(tmp.name + "-vocab"))
    pipe = TextToVideoSDPipeline(
        unet=random_fp16(lambda: UNet3DConditionModel(**kwargs["unet"]), 0),
        vae=random_fp16(lambda: AutoencoderKL(**kwargs["vae"]), 1),
        text_encoder=random_fp16(lambda: CLIPTextModel(CLIPTextConfig(**kwargs["text_encoder"])), 2),
        tokenizer=CLIPTokenizer(str(vocab / "vocab.json"), str(vocab / "merges.txt"), pad_token="!"),
        scheduler=DDIMScheduler.from_config(SCHEDULER_CONFIG),
    )
    assert all(p.dtype == torch.float16 for p in pipe.unet.parameters())
    pipe.save_pretrained(tmp, safe_serialization=True, variant="fp16")
    # The tokenizer as published (transformers 4's vocab.json + merges.txt), not transformers 5's tokenizer.json.
    # Only the text encoder's embedding has the full 49408-token size; the vocabulary is a tiny one.
    shutil.rmtree(tmp / "tokenizer")
    write_tiny_clip_vocab(tmp / "tokenizer")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "!",
               "unk_token": "<|endoftext|>"}  # fmt: skip
    (tmp / "tokenizer" / "special_tokens_map.json").write_text(json.dumps(special))
    (tmp / "tokenizer" / "tokenizer_config.json").write_text(
        json.dumps({"model_max_length": 77, "do_lower_case": True, "tokenizer_class": "CLIPTokenizer"})
    )
    shutil.rmtree(vocab)
    os.replace(tmp, dst)


def make_models(preset: str, workdir: Path, rebuild: bool) -> dict[str, Path]:
    """The two folders for ``preset``, made once and cached under ``workdir``."""
    base = workdir / preset
    folders = {"diffusers": base / "diffusers", "cinematic": base / "cinematic"}
    if rebuild:
        for folder in folders.values():
            shutil.rmtree(folder, ignore_errors=True)
    if not (folders["diffusers"] / "model_index.json").is_file() or not (folders["cinematic"] / "model.json").is_file():
        base.mkdir(parents=True, exist_ok=True)
        print(f"writing the {preset} random-weight model into {base} (once) ...", flush=True)
        start = time.perf_counter()
        run_child([__file__, "--make", preset, str(base)], env=CHILD_ENV)
        print(f"  done in {time.perf_counter() - start:.0f} s", flush=True)
    return folders


def make_child(preset: str, base: Path) -> None:
    import torch

    from cinematic.weights import convert

    folders = {"diffusers": base / "diffusers", "cinematic": base / "cinematic"}
    if not (folders["diffusers"] / "model_index.json").is_file():
        make_diffusers_folder(preset, folders["diffusers"])
    shutil.rmtree(folders["cinematic"], ignore_errors=True)
    convert(folders["diffusers"], folders["cinematic"], dtype=torch.float16)
    emit({"ok": True})


# ---------------------------------------------------------------------------------------------------------------------
# One measured load (a child process).


def load_child(spec: dict[str, Any]) -> None:
    start = time.perf_counter()
    import torch

    rss_torch = current_rss()
    dtype = getattr(torch, spec["dtype"])
    if spec["loader"] == "cinematic":
        from cinematic.weights import load

        def run():
            model = load(spec["folder"], dtype=dtype, variant=spec["variant"])
            return [model.unet, model.text_encoder, model.vae]

    else:
        from diffusers import TextToVideoSDPipeline
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()

        def run():
            pipe = TextToVideoSDPipeline.from_pretrained(spec["folder"], torch_dtype=dtype, variant=spec["variant"])
            return [pipe.unet, pipe.text_encoder, pipe.vae]

    rss_base = current_rss()
    import_s = time.perf_counter() - start
    start = time.perf_counter()
    modules = run()
    load_s = time.perf_counter() - start
    peak_load = peak_rss()
    start = time.perf_counter()
    touch(modules)
    touch_s = time.perf_counter() - start
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for m in modules for p in m.parameters()})
    emit(
        {
            "import_s": import_s,
            "load_s": load_s,
            "touch_s": touch_s,
            "rss_after_import_torch": rss_torch,
            "rss_before_load": rss_base,
            "peak_rss_load": peak_load,
            "peak_rss": peak_rss(),
            "rss_end": current_rss(),
            "weights_bytes": tensor_bytes(modules),
            "dtypes": dtypes,
        }
    )


# ---------------------------------------------------------------------------------------------------------------------
# The parent: run every case, summarise.


def measure(case: tuple, folders: dict[str, Path], repeats: int) -> dict[str, Any]:
    label, loader, layout, dtype, variant = case
    spec = {"loader": loader, "folder": str(folders[layout]), "dtype": dtype, "variant": variant}
    argv = [__file__, "--child", json.dumps(spec)]
    run_child(argv, env=CHILD_ENV)  # warm-up: the page cache now holds the files
    runs = [run_child(argv, env=CHILD_ENV) for _ in range(repeats)]
    summary = {key: median([r[key] for r in runs]) for key in runs[0] if isinstance(runs[0][key], (int, float))}
    summary["peak_delta"] = median([r["peak_rss"] - r["rss_before_load"] for r in runs])
    summary["peak_delta_load"] = median([r["peak_rss_load"] - r["rss_before_load"] for r in runs])
    summary["load_touch_s"] = median([r["load_s"] + r["touch_s"] for r in runs])
    summary["ratio"] = summary["peak_delta"] / summary["weights_bytes"]
    summary["dtypes"] = runs[0]["dtypes"]
    return {"loader": label, "layout": layout, "dtype": dtype, "variant": variant, **summary, "runs": runs}


def report(results: list[dict[str, Any]]) -> str:
    reference = {r["dtype"]: r for r in results if r["loader"] == "diffusers"}
    headers = [
        "loader", "files", "dtype", "import s", "load s", "load+touch s", "weights GiB", "RSS torch MiB",
        "RSS base MiB", "peak Δ load GiB", "peak Δ GiB", "peak Δ / weights", "load+touch vs diffusers",
        "peak Δ vs diffusers",
    ]  # fmt: skip
    rows = []
    for r in results:
        ref = reference.get(r["dtype"])
        rows.append(
            [
                r["loader"],
                r["layout"] + (f" ({r['variant']})" if r["variant"] else ""),
                r["dtype"],
                f"{r['import_s']:.2f}",
                f"{r['load_s']:.2f}",
                f"{r['load_touch_s']:.2f}",
                f"{r['weights_bytes'] / GIB:.3f}",
                f"{r['rss_after_import_torch'] / MIB:.0f}",
                f"{r['rss_before_load'] / MIB:.0f}",
                f"{r['peak_delta_load'] / GIB:.3f}",
                f"{r['peak_delta'] / GIB:.3f}",
                f"{r['ratio']:.2f}",
                f"{r['load_touch_s'] / ref['load_touch_s']:.2f}x" if ref else "-",
                f"{r['peak_delta'] / ref['peak_delta']:.2f}x" if ref else "-",
            ]
        )
    return markdown_table(headers, rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/cinematic-bench"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="write every measurement here")
    parser.add_argument("--rebuild", action="store_true", help="write the model folders again")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--make", nargs=2, metavar=("PRESET", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return load_child(json.loads(args.child))
    if args.make:
        return make_child(args.make[0], Path(args.make[1]))

    folders = make_models(args.preset, args.workdir, args.rebuild)
    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, {info.get('ram_gib', '?')} GiB RAM, torch {info['torch']}")
    print(
        f"preset {args.preset}: each load in a fresh process; median of {args.repeats} runs after 1 warm-up run "
        "(page cache warm)\n",
        flush=True,
    )
    results = []
    for case in CASES:
        print(f"  {case[0]} {case[2]} {case[3]} ...", end=" ", flush=True)
        results.append(measure(case, folders, args.repeats))
        r = results[-1]
        print(f"load {r['load_s']:.2f} s, peak Δ {r['peak_delta'] / GIB:.3f} GiB ({r['ratio']:.2f}x)", flush=True)
    print()
    print(report(results))
    ours = [r for r in results if r["loader"] == "cinematic"]
    worst = max(ours, key=lambda r: r["ratio"])
    verdict = "meets" if worst["ratio"] <= TARGET else "misses"
    if args.preset == "tiny":  # kilobytes of weights: the peak is fixed overhead (imports), not the weights
        verdict = "(not meaningful for the tiny preset) would miss" if worst["ratio"] > TARGET else verdict
    print(
        f"\ncinematic's worst peak Δ / weights: {worst['ratio']:.2f} ({worst['layout']} {worst['dtype']}): "
        f"{verdict} the {TARGET}x target. peak Δ = ru_maxrss after load and touch - RSS before the load."
    )
    if args.json:
        payload = {"preset": args.preset, "repeats": args.repeats, "warmup_runs": 1, "machine": info}
        payload |= {"target_ratio": TARGET, "folders": {k: str(v) for k, v in folders.items()}, "results": results}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
