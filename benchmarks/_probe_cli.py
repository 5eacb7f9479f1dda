"""The probe's cases against the ``cinematic`` command: each a child process given a bad input, judged by
``Probe.refusal`` (exit 2, one line naming the fault, no traceback, no code run, no file left)."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _probe_base import CHILD_ENV, QUICK, ROOT, Case, Probe, Tmpfs, cinematic, guarded, later, listing, settle

SHAPES = ROOT / "src" / "cinematic" / "assets" / "shapes"
PAYLOADS = ("os.system", "exec", "open")


class Payload:
    """Unpickling it would run code that creates ``marker``: a shell command, ``exec`` of Python, or ``open``."""

    def __init__(self, kind: str, marker: Path):
        self.kind, self.marker = kind, str(marker)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        if self.kind == "os.system":
            return os.system, (f"touch {self.marker}",)
        if self.kind == "exec":
            return exec, (f"open({self.marker!r}, 'w').close()",)
        return open, (self.marker, "w")


def _generate(model: Path | str, out: Path, *extra: str) -> list[str | bytes]:
    return cinematic("generate", "a red circle", "--model", str(model), "-o", str(out), "--seed", "0",
                     "--num-inference-steps", "1", "--num-frames", "2", *extra)  # fmt: skip


def _commands(model: Path, out: Path) -> dict[str, list[str | bytes]]:
    return {"info": cinematic("info", str(model)), "generate": _generate(model, out / "clip.mp4")}


def _copy(folder: Path, probe: Probe, name: str) -> tuple[Path, Path]:
    """A copy of ``folder`` in a fresh case folder, and an empty output folder beside it."""
    case = probe.fresh(name)
    (case / "out").mkdir()
    return Path(shutil.copytree(folder, case / "model", symlinks=True)), case / "out"


def _to_bin(folder: Path) -> Path:
    """A diffusers folder with each component's weights as a pickled ``.bin``, as older repos ship them."""
    from safetensors.torch import load_file

    for component, name in (("unet", "diffusion_pytorch_model"), ("text_encoder", "pytorch_model"),
                            ("vae", "diffusion_pytorch_model")):  # fmt: skip
        source = folder / component / f"{'model' if component == 'text_encoder' else name}.safetensors"
        torch.save(load_file(str(source)), folder / component / f"{name}.bin")
        source.unlink()
    return folder


def fixtures(probe: Probe) -> dict[str, Path]:
    """The model folders the cases start from: the bundled shapes model, and tiny ModelScope and diffusers ones."""
    from tests.factories import make_diffusers_folder, make_modelscope_folder

    base = probe.fresh("fixtures")
    safetensors = make_diffusers_folder(base / "diffusers")
    with_bin = _to_bin(Path(shutil.copytree(safetensors, base / "diffusers-bin")))
    return {"shapes": SHAPES, "modelscope": make_modelscope_folder(base / "modelscope"), "diffusers": safetensors,
            "diffusers-bin": with_bin}  # fmt: skip


def hostile_pickles(probe: Probe, models: dict[str, Path]) -> None:
    """Every pickle a loader reads, in both torch formats, with each payload, through info and generate; and a LoRA
    adapter .bin through generate."""
    targets = [("modelscope", n) for n in ("text2video_pytorch_model.pth", "open_clip_pytorch_model.bin",
                                           "VQGAN_autoencoder.pth")]  # fmt: skip
    targets += [("diffusers-bin", n) for n in ("unet/diffusion_pytorch_model.bin", "text_encoder/pytorch_model.bin",
                                               "vae/diffusion_pytorch_model.bin")]  # fmt: skip
    kinds = PAYLOADS[:1] if probe.quick else PAYLOADS
    for (layout, name), legacy, kind in ((t, legacy, k) for t in targets for legacy in (False, True) for k in kinds):
        for command in ("info", "generate"):
            model, out = _copy(models[layout], probe, "pickle")
            marker = model.parent / "pwned"
            payload = {"x": torch.zeros(1), "payload": Payload(kind, marker)}
            torch.save(payload, model / name, _use_new_zipfile_serialization=not legacy)
            label = f"{layout} {name}, {'legacy' if legacy else 'zip'} pickle calling {kind}, {command}"
            words = ["refusing to load", Path(name).name]
            later(probe, "hostile pickle", label, _commands(model, out)[command], words, outdir=out, marker=marker)
    for legacy, kind in ((legacy, k) for legacy in (False, True) for k in kinds):
        case = probe.fresh("lora")
        adapter, marker = case / "adapter.bin", case / "pwned"
        torch.save({"payload": Payload(kind, marker)}, adapter, _use_new_zipfile_serialization=not legacy)
        argv = _generate("shapes", case / "clip.mp4", "--lora", str(adapter))
        label = f"LoRA adapter .bin, {'legacy' if legacy else 'zip'} pickle calling {kind}, generate"
        later(probe, "hostile pickle", label, argv, ["adapter.bin"], outdir=case, marker=marker)  # read as safetensors


def _safetensors(header: dict | bytes, data: bytes = b"", declared: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if declared is None else declared) + raw + data


def _entry(dtype: str, shape: list[int], start: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}


def corrupt_safetensors(probe: Probe, models: dict[str, Path]) -> None:
    vae = (SHAPES / "vae.safetensors").read_bytes()
    files = {
        "header not an object": ("vae", _safetensors(b"[1, 2]"), "not an object"),
        "header not JSON": ("vae", _safetensors(b"{'a': 1}"), "not valid JSON"),
        "header past the end": ("vae", _safetensors(b"{}", declared=1000), "runs past the end"),
        "unknown dtype": ("vae", _safetensors({"a": _entry("F7", [2], 0, 8)}, bytes(8)), "dtype 'F7'"),
        "overlapping tensors": (
            "vae",
            _safetensors({"a": _entry("F32", [2], 0, 8), "b": _entry("F32", [1], 4, 8)}, bytes(8)),
            "overlaps",
        ),  # fmt: skip
        "truncated by one byte": ("vae", vae[:-1], "need"),
        "four trailing bytes": ("vae", vae + bytes(4), "4 bytes follow the last tensor"),
    }
    for (label, (component, data, words)), command in ((f, c) for f in files.items() for c in ("info", "generate")):
        model, out = _copy(models["shapes"], probe, "corrupt")
        (model / f"{component}.safetensors").write_bytes(data)
        argv = _commands(model, out)[command]
        later(probe, "corrupt safetensors", f"{label}, {command}", argv, [f"{component}.safetensors", words],
                      outdir=out, limit_s=60)  # fmt: skip
    for command in ("info", "generate"):  # a sparse 10 GB file declaring a 10 GB header: refused from 8 bytes
        model, out = _copy(models["shapes"], probe, "sparse")
        path = model / "text_encoder.safetensors"
        path.write_bytes(struct.pack("<Q", 10**10))
        os.truncate(path, 10**10 + 8)
        words = ["text_encoder.safetensors", "over the safetensors limit"]
        argv = _commands(model, out)[command]
        later(probe, "corrupt safetensors", f"sparse 10 GB header, {command}", argv, words, outdir=out, limit_mb=1000)


def _shard(folder: Path) -> dict[str, str]:
    """Split the diffusers folder's UNet into two shards with an index; the index's weight map."""
    from safetensors.torch import load_file, save_file

    single = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(single))
    keys = sorted(state)
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2 :])):
        name = f"diffusion_pytorch_model-0000{i + 1}-of-00002.safetensors"
        save_file({k: state[k] for k in part}, str(folder / "unet" / name))
        weight_map |= {k: name for k in part}
    single.unlink()
    return weight_map


def escaping_index(probe: Probe, models: dict[str, Path]) -> None:
    for escape, command in ((e, c) for e in ("absolute", "dot-dot", "symlink") for c in ("info", "generate")):
        model, out = _copy(models["diffusers"], probe, "index")
        weight_map = _shard(model)
        outside = model.parent / "outside.safetensors"
        shutil.copy(model / "vae" / "diffusion_pytorch_model.safetensors", outside)
        (model / "unet" / "link.safetensors").symlink_to(outside)
        name = {"absolute": str(outside), "dot-dot": "../../outside.safetensors", "symlink": "link.safetensors"}
        weight_map[sorted(weight_map)[-1]] = name[escape]
        index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
        (model / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
        later(probe, "sharded index", f"a shard {escape} outside the folder, {command}",
                      _commands(model, out)[command], ["index.json: the shard of"], outdir=out)  # fmt: skip


def bad_configs(probe: Probe, models: dict[str, Path]) -> None:
    from tests.test_checked_files import edit_json

    edits = {
        "text_encoder.layers = 10**9": ("shapes", "model.json", ("text_encoder", "layers"), 10**9),
        "schedule.num_train_timesteps = 10**10": ("shapes", "model.json", ("schedule", "num_train_timesteps"), 10**10),
        "unet.levels[0].channels = 10**9": ("shapes", "model.json", ("unet", "levels", 0, "channels"), 10**9),
        'defaults.frames = "16"': ("shapes", "model.json", ("defaults", "frames"), "16"),
        'unet.layers_per_block = "2"': ("shapes", "model.json", ("unet", "layers_per_block"), "2"),
        'diffusers sample_size = "abc"': ("diffusers", "unet/config.json", ("sample_size",), "abc"),
    }
    for (label, (layout, file, keys, value)), command in ((e, c) for e in edits.items() for c in ("info", "generate")):
        model, out = _copy(models[layout], probe, "config")
        edit_json(model / file, *keys, value)
        field = label.split(" = ")[0].removeprefix("diffusers ").replace("[0]", "[]")
        later(probe, "bad config", f"{label}, {command}", _commands(model, out)[command], [file, field], outdir=out,
                      limit_s=60, limit_mb=1500)  # fmt: skip


def prompts_and_devices(probe: Probe) -> None:
    case = probe.fresh("prompt")
    for flag in ("prompt", "--negative-prompt"):
        text = [b"a red \xff circle"] if flag == "prompt" else ["a red circle", "--negative-prompt", b"blue \xff"]
        argv = cinematic("generate", *text, "-o", str(case / "clip.mp4"), *QUICK)
        probe.refusal("input", f"non-UTF-8 {flag.strip('-')}", argv, ["UTF-8", "0xff"], outdir=case)
    devices = ["bogus", "meta", *([] if torch.cuda.is_available() else ["cuda"])]
    for device in devices:
        argv = cinematic("generate", "a red circle", "-o", str(case / "clip.mp4"), "--device", device, *QUICK)
        probe.refusal("device", f"generate --device {device}", argv, ["device", device], outdir=case)
    for device in ("bogus", *([] if torch.cuda.is_available() else ["cuda"])):
        argv = cinematic("serve", "--device", device, "--data", str(case / "data"), "--port", "0")
        probe.refusal("device", f"serve --device {device}", argv, ["device", device], outdir=case)


def full_disk(probe: Probe) -> None:
    """A file size limit (RLIMIT_FSIZE: every write past it fails), then a real full disk on a tmpfs."""
    case = probe.fresh("fsize")

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (256, 256))

    for output in ("clip.mp4", "clip.gif", "frames"):
        argv = cinematic("generate", "a red circle", "-o", str(case / output), *QUICK)
        probe.refusal("full disk", f"file size limit, -o {output}", argv, ["cannot write"], outdir=case, preexec=limit)
    disk = Tmpfs(probe.fresh("tmpfs") / "disk", "1m").mount()
    if disk is None:
        probe.add(Case("full disk", "full tmpfs, -o clip.mp4", "exit 2", "-", False, not_run="mount needs root"))
        return
    try:
        disk.fill()
        argv = cinematic("generate", "a red circle", "-o", str(disk.folder / "clip.mp4"), *QUICK)
        probe.refusal("full disk", "full tmpfs, -o clip.mp4", argv, ["No space left on device"], outdir=disk.folder)
    finally:
        disk.unmount()


# The CLI, with the mp4 muxer held once the temporary file is complete, until a signal arrives.
HELD_WRITE = """
import sys, time
from cinematic import cli, video
real_mux = video._mux
def held_mux(tmp, *args, **kwargs):
    real_mux(tmp, *args, **kwargs)
    print("writing", tmp, flush=True)
    time.sleep(300)
video._mux = held_mux
sys.exit(cli.main(sys.argv[1:]))
"""


def _terminated(probe: Probe, label: str, argv: list[str | bytes], ready: str, outdir: Path) -> None:
    """Start ``argv``, send SIGTERM once its output shows ``ready``, and judge what it leaves."""
    log = outdir.parent / f"{outdir.name}.log"
    with open(log, "w") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=CHILD_ENV, cwd=ROOT)
        deadline = time.monotonic() + 300
        while ready not in log.read_text() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        seen = [p for p in listing(outdir)]
        process.send_signal(signal.SIGTERM)
        process.wait(120)
    text = log.read_text()
    left = listing(outdir)
    ok = process.returncode == 128 + signal.SIGTERM and "no output file was written" in text
    ok = ok and "Traceback" not in text and not left
    got = f"exit {process.returncode}, {text.strip().splitlines()[-1][:80]!r}, in the folder before: {seen}"
    probe.add(Case("signal", label, "exit 143, 'no output file was written', nothing left", got, ok,
                   "Traceback" in text, left_behind=left))  # fmt: skip


def sigterm(probe: Probe) -> None:
    out = probe.fresh("sigterm") / "out"
    out.mkdir()
    argv = [sys.executable, "-c", HELD_WRITE, "generate", "a red circle", "-o", str(out / "clip.mp4"), *QUICK]
    _terminated(probe, "SIGTERM while the temporary mp4 is written", argv, "writing ", out)
    out = probe.fresh("sigterm") / "out"
    out.mkdir()
    argv = cinematic("generate", "a red circle", "-o", str(out / "clip.mp4"), "--num-inference-steps", "500")
    _terminated(probe, "SIGTERM while sampling", argv, "sampling", out)


def pictures(probe: Probe) -> None:
    from tests.factories import bomb_gif, bomb_png

    from cinematic import video

    case = probe.fresh("pictures")
    out = case / "out"
    out.mkdir()
    short = video.write(case / "short.mp4", np.zeros((3, 32, 32, 3), np.uint8))
    argv = cinematic("generate", "a cat", "-o", str(out / "clip.mp4"), "--init-video", str(short), *QUICK[:4])
    probe.refusal("pictures", "init video of 3 frames, --num-frames 8", [*argv, "--num-frames", "8"],
                  ["num_frames", "3 frames, fewer than the 8"], outdir=out)  # fmt: skip
    (case / "bomb.gif").write_bytes(bomb_gif(frames=2))
    (case / "bomb.png").write_bytes(bomb_png())
    base = cinematic("generate", "a cat", "-o", str(out / "clip.mp4"), "--device", "cpu")
    baseline = probe.refusal("pictures", "missing init image (the baseline)", [*base, "--init-image",
                             str(case / "missing.png")], ["no such init image"], outdir=out)  # fmt: skip
    for flag, name in (("--init-image", "bomb.gif"), ("--init-video", "bomb.gif"), ("--init-image", "bomb.png")):
        label = f"{flag} {name}: {(case / name).stat().st_size} bytes declaring 16000x16000"
        probe.refusal("pictures", label, [*base, flag, str(case / name)], ["over the limit of 4096x4096 pixels"],
                      outdir=out, limit_mb=baseline.peak_mb + 100)  # fmt: skip


def run_all(probe: Probe) -> None:
    models = fixtures(probe)
    for cases in (hostile_pickles, corrupt_safetensors, escaping_index, bad_configs):
        guarded(probe, "cli", cases, models)
    settle(probe)
    for cases in (prompts_and_devices, full_disk, sigterm, pictures):
        guarded(probe, "cli", cases)
