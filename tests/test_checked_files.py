"""Checked files (issue 23): corrupt weights, escaping indexes and absurd configs end in one line and exit 2, before
anything is read or built; ``info`` accepts every file that loading accepts."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import cinematic.generation.pictures  # noqa: F401 - imported once here, so that the timed CLI calls import nothing
import cinematic.pipeline  # noqa: F401
from cinematic.cli import main
from cinematic.errors import CinematicError
from cinematic.models import sizes
from cinematic.models.components import ModelConfig
from cinematic.models.presets import PRESETS
from cinematic.models.unet3d_config import ShapesOptions, UNetLevel
from cinematic.weights import build_networks, load
from cinematic.weights.files import SAFETENSORS_MAX_HEADER, read_safetensors, read_weights
from tests.clip_vocab import write_tiny_clip_vocab

TINY = PRESETS["tiny"]
BUNDLED_SHAPES = Path(__file__).resolve().parent.parent / "src" / "cinematic" / "assets" / "shapes" / "model.json"


# --- fixtures: a tiny model in cinematic's layout and in a hand-written diffusers layout ---------------------------


def _states(config: ModelConfig) -> dict[str, dict[str, torch.Tensor]]:
    from cinematic.models.text_encoder import TextEncoder
    from cinematic.models.unet3d import UNet3D
    from cinematic.models.vae import VAE

    networks = {"unet": UNet3D(config.unet), "text_encoder": TextEncoder(config.text_encoder), "vae": VAE(config.vae)}
    return {name: dict(network.state_dict()) for name, network in networks.items()}


@pytest.fixture(scope="module")
def native_dir(tmp_path_factory) -> Path:
    from cinematic.weights.native import write_native

    root = tmp_path_factory.mktemp("native")
    vocab = write_tiny_clip_vocab(root / "vocab")
    states = _states(TINY)
    return write_native(
        root / "model", TINY, {n: (lambda s=s: dict(s)) for n, s in states.items()}, vocab, torch.float32
    )


def _diffusers_configs(config: ModelConfig) -> dict[str, dict]:
    unet, text, vae = config.unet, config.text_encoder, config.vae
    down = ["CrossAttnDownBlock3D" if level.attention else "DownBlock3D" for level in unet.levels]
    return {
        "unet": {
            "_class_name": "UNet3DConditionModel", "block_out_channels": [level.channels for level in unet.levels],
            "down_block_types": down,
            "up_block_types": [d.replace("Down", "Up") for d in reversed(down)],
            "layers_per_block": unet.layers_per_block, "attention_head_dim": unet.head_dim,
            "cross_attention_dim": unet.cross_attention_dim, "norm_num_groups": unet.norm_groups, "sample_size": 4,
        },
        "text_encoder": {
            "vocab_size": text.vocab_size, "hidden_size": text.width, "num_hidden_layers": text.layers,
            "num_attention_heads": text.heads, "intermediate_size": text.mlp_width, "max_position_embeddings": 77,
        },
        "vae": {
            "block_out_channels": list(vae.block_out_channels), "layers_per_block": vae.layers_per_block,
            "norm_num_groups": vae.norm_groups, "latent_channels": vae.latent_channels,
            "down_block_types": ["DownEncoderBlock2D"] * len(vae.block_out_channels),
            "up_block_types": ["UpDecoderBlock2D"] * len(vae.block_out_channels),
        },
        "scheduler": {"_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                      "num_train_timesteps": 1000, "beta_schedule": "scaled_linear"},
    }  # fmt: skip


@pytest.fixture(scope="module")
def diffusers_dir(tmp_path_factory) -> Path:
    """The tiny preset in diffusers' folder layout (our keys are diffusers'), its UNet sharded in two files."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("dif") / "model"
    configs = _diffusers_configs(TINY)
    for name, config in configs.items():
        (folder / name).mkdir(parents=True)
        file = "scheduler_config.json" if name == "scheduler" else "config.json"
        (folder / name / file).write_text(json.dumps(config))
    (folder / "model_index.json").write_text(json.dumps({c: ["x", "y"] for c in [*configs, "tokenizer"]}))
    write_tiny_clip_vocab(folder / "tokenizer")
    states = _states(TINY)
    save_file(states["text_encoder"], str(folder / "text_encoder" / "model.safetensors"))
    save_file(states["vae"], str(folder / "vae" / "diffusion_pytorch_model.safetensors"))
    keys = sorted(states["unet"])
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2 :])):
        name = f"diffusion_pytorch_model-0000{i + 1}-of-00002.safetensors"
        save_file({k: states["unet"][k] for k in part}, str(folder / "unet" / name))
        weight_map |= {k: name for k in part}
    _write_index(folder, weight_map)
    return folder


def _write_index(folder: Path, weight_map: dict[str, str]) -> Path:
    path = folder / "unet" / "diffusion_pytorch_model.safetensors.index.json"
    path.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return path


def _copy(folder: Path, tmp_path: Path, name: str = "copy") -> Path:
    return Path(shutil.copytree(folder, tmp_path / name, symlinks=True))


def _run(capsys, *args: str) -> tuple[int, list[str], float]:
    """``cinematic ARGS`` in this process: exit code, stderr lines, CPU seconds (not wall time, which the other jobs
    on a shared machine stretch)."""
    capsys.readouterr()
    start = time.process_time()
    code = main(list(args))
    seconds = time.process_time() - start
    return code, capsys.readouterr().err.strip().splitlines(), seconds


def _refused(capsys, folder: Path, message: str, command: str = "info") -> str:
    """``info`` (or ``generate``) on ``folder`` is exit 2 with one line holding ``message``, within a second."""
    output = str(folder.parent / "never-written.mp4")
    generate = ["generate", "a cat", "--model", str(folder), "--num-inference-steps", "1", "--seed", "0", "-o", output]
    code, lines, seconds = _run(capsys, *(["info", str(folder)] if command == "info" else generate))
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: ") and re.search(message, lines[0]), lines[0]
    assert seconds < 1.0, f"{seconds:.2f} s: something was built or read"
    assert not Path(output).exists()
    return lines[0]


def test_fixtures_are_valid(native_dir, diffusers_dir, capsys):
    for folder in (native_dir, diffusers_dir):
        code, lines, _ = _run(capsys, "info", str(folder))
        assert code == 0, lines
    assert load(diffusers_dir).unet.conv_in.weight.shape[0] == 16


# --- safetensors files, made by hand -------------------------------------------------------------------------------


def _safetensors(header: dict | bytes, data: bytes = b"", declared: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if declared is None else declared) + raw + data


def _entry(dtype: str, shape: list[int], start: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}


GOOD = {"a": _entry("F32", [2], 0, 8), "b": _entry("F16", [2, 2], 8, 16)}
CORRUPT = {
    "not an object": (_safetensors(b"[1, 2]"), "not an object"),
    "not JSON": (_safetensors(b"{'a': 1}"), "not valid JSON"),
    "not UTF-8": (_safetensors(b'{"\xff": 1}'), "not valid JSON"),
    "nested too deeply": (_safetensors(b"[" * 100_000 + b"]" * 100_000), "nested too deeply"),
    "shorter than 8 bytes": (b"\x01\x00", "fewer than the 8"),
    "header past the end": (_safetensors(b"{}", declared=1000), "runs past the end"),
    "header over the cap": (_safetensors(b"{}", declared=SAFETENSORS_MAX_HEADER + 1), "over the safetensors limit"),
    "unknown dtype": (_safetensors({"a": _entry("F7", [2], 0, 8)}, bytes(8)), "dtype 'F7'"),
    "dtype not a string": (_safetensors({"a": _entry(["F32"], [2], 0, 8)}, bytes(8)), "dtype"),
    "entry not an object": (_safetensors({"a": [1, 2]}, bytes(8)), "not an object"),
    "negative shape": (_safetensors({"a": _entry("F32", [-2], 0, 8)}, bytes(8)), "shape"),
    "bool shape": (_safetensors({"a": _entry("F32", [True], 0, 4)}, bytes(4)), "shape"),
    "span not the shape's size": (_safetensors({"a": _entry("F32", [3], 0, 8)}, bytes(8)), "needs 12 bytes"),
    "reversed offsets": (_safetensors({"a": _entry("F32", [0], 8, 0)}, bytes(8)), "needs 0 bytes"),
    "one offset": (_safetensors({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8]}}, bytes(8)), "offsets"),
    "overlap": (_safetensors({"a": _entry("F32", [2], 0, 8), "b": _entry("F32", [1], 4, 8)}, bytes(8)), "overlaps"),
    "gap": (_safetensors({"a": _entry("F32", [1], 4, 8)}, bytes(8)), "unused bytes"),
    "truncated": (_safetensors(GOOD, bytes(12)), "need 16 bytes of data but the file holds 12"),
    "past the end": (_safetensors({"a": _entry("F32", [2**40], 0, 2**42)}, bytes(8)), "need"),
    "trailing bytes": (_safetensors(GOOD, bytes(20)), "4 bytes follow the last tensor"),
    "duplicate key": (
        _safetensors(b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": 1}', bytes(4)),
        "names a twice",
    ),  # fmt: skip
    "key with a newline": (_safetensors({"a\nb": _entry("F32", [3], 0, 8)}, bytes(8)), "tensor 'a\\nb'"),
    "metadata not strings": (_safetensors({"__metadata__": {"x": 1}, **GOOD}, bytes(16)), "__metadata__"),
}


def test_a_good_hand_made_file_reads(tmp_path):
    path = tmp_path / "good.safetensors"
    path.write_bytes(_safetensors({"__metadata__": {"format": "pt"}, **GOOD}, struct.pack("<2f4e", 1, 2, 3, 4, 5, 6)))
    state = read_safetensors(path)
    assert state["a"].tolist() == [1.0, 2.0] and state["b"].tolist() == [[3.0, 4.0], [5.0, 6.0]]


@pytest.mark.parametrize("name", list(CORRUPT))
def test_corrupt_safetensors_is_one_line_naming_file_and_fault(tmp_path, name):
    data, message = CORRUPT[name]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data)
    for read in (read_safetensors, lambda p: read_safetensors(p, torch.float16)):
        with pytest.raises(CinematicError, match=re.escape(str(path))) as error:
            read(path)
        assert message in str(error.value) and "\n" not in str(error.value)
    from cinematic.weights.lora_formats import read_metadata

    with pytest.raises(CinematicError, match=re.escape(message)):
        read_metadata(path)


@pytest.mark.parametrize("name", ["not an object", "truncated", "overlap", "unknown dtype", "trailing bytes"])
@pytest.mark.parametrize("command", ["info", "generate"])
def test_cli_refuses_a_corrupt_weights_file(native_dir, tmp_path, capsys, name, command):
    folder = _copy(native_dir, tmp_path)
    (folder / "vae.safetensors").write_bytes(CORRUPT[name][0])
    line = _refused(capsys, folder, re.escape(CORRUPT[name][1]), command)
    assert "vae.safetensors" in line


def test_a_truncated_real_file_is_not_reported_as_fine(native_dir, tmp_path, capsys):
    folder = _copy(native_dir, tmp_path)
    data = (folder / "unet.safetensors").read_bytes()
    (folder / "unet.safetensors").write_bytes(data[:-1])
    _refused(capsys, folder, "unet.safetensors is not a valid safetensors file .*need")


def test_a_sparse_file_with_a_huge_header_is_refused_without_reading_it(native_dir, tmp_path):
    """A 10 GB sparse file declaring a 10 GB header: refused from its first 8 bytes (a subprocess, so that a
    regression that reads it shows as time and memory, not as a hung test run)."""
    folder = _copy(native_dir, tmp_path)
    path = folder / "text_encoder.safetensors"
    path.write_bytes(struct.pack("<Q", 10**10))
    os.truncate(path, 10**10 + 8)  # sparse: no disk blocks behind the declared header
    code = (
        "import sys, time, resource; import cinematic.weights.diffusers_layout, cinematic.weights.native;"
        "from cinematic.cli import main; start = time.process_time();"
        f"code = main(['info', {str(folder)!r}]); seconds = time.process_time() - start;"
        "print(code, seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    exit_code, seconds, peak_kb = result.stdout.split()
    assert exit_code == "2" and float(seconds) < 1.0
    assert int(peak_kb) < 2_000_000  # a read of the header alone would be 10 GB
    (line,) = result.stderr.strip().splitlines()
    assert "text_encoder.safetensors" in line and "over the safetensors limit" in line


# --- sharded indexes -----------------------------------------------------------------------------------------------


def test_a_sharded_checkpoint_loads(diffusers_dir):
    state = read_weights(diffusers_dir / "unet" / "diffusion_pytorch_model.safetensors.index.json")
    assert state.keys() == build_networks(TINY)["unet"].state_dict().keys()


def _escaping_entries(folder: Path) -> dict[str, str]:
    """Index entries that leave the folder, each pointing at a loadable file."""
    outside = folder.parent / "x.safetensors"
    shutil.copy(folder / "vae" / "diffusion_pytorch_model.safetensors", outside)
    (folder / "unet" / "link.safetensors").symlink_to(outside)
    return {
        "absolute": "/etc/passwd",
        "dot-dot": "../../x.safetensors",
        "symlink": "link.safetensors",
        "windows absolute": "C:\\x.safetensors",
        "backslash dot-dot": "..\\..\\x.safetensors",
    }


@pytest.mark.parametrize("case", ["absolute", "dot-dot", "symlink", "windows absolute", "backslash dot-dot"])
def test_an_index_may_only_name_files_in_its_folder(diffusers_dir, tmp_path, capsys, monkeypatch, case):
    folder = _copy(diffusers_dir, tmp_path)
    name = _escaping_entries(folder)[case]
    index = json.loads((folder / "unet" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    weight_map[sorted(weight_map)[-1]] = name  # the last entry: the good shards come first
    _write_index(folder, weight_map)
    opened = []
    import cinematic.weights.files as files

    monkeypatch.setattr(files, "read_safetensors", lambda path, dtype=None: opened.append(path))
    monkeypatch.setattr(files, "read_torch", lambda path: opened.append(path))
    for command in ("info", "generate"):
        line = _refused(capsys, folder, "diffusion_pytorch_model.safetensors.index.json: the shard of ", command)
        assert sorted(weight_map)[-1] in line and repr(name)[:50] in line
    assert opened == []  # refused before any shard was opened


def test_an_index_in_a_hub_cache_may_point_into_its_blobs(diffusers_dir, tmp_path):
    """huggingface_hub's cache: snapshots/<rev>/unet/x.safetensors is a symlink to ../../../blobs/<hash>."""
    repo = tmp_path / "hub" / "models--owner--name"
    snapshot = _copy(diffusers_dir, repo / "snapshots", "0" * 40)
    (repo / "blobs").mkdir()
    for shard in (snapshot / "unet").glob("*-of-*.safetensors"):
        blob = repo / "blobs" / shard.name.replace("diffusion", "hash")
        shard.rename(blob)
        shard.symlink_to(os.path.relpath(blob, shard.parent))
    model = load(snapshot)
    assert model.format == "diffusers"


def test_a_tensor_in_two_shards_is_refused(diffusers_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _copy(diffusers_dir, tmp_path)
    first, second = sorted((folder / "unet").glob("*-of-*.safetensors"))
    state = load_file(str(second))
    save_file({**state, "conv_in.weight": torch.zeros(1)}, str(second))
    with pytest.raises(CinematicError, match="conv_in.weight is stored in more than one shard"):
        read_weights(folder / "unet" / "diffusion_pytorch_model.safetensors.index.json")


def test_an_index_without_weight_map_is_refused(diffusers_dir, tmp_path, capsys):
    folder = _copy(diffusers_dir, tmp_path)
    (folder / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text("[]")
    _refused(capsys, folder, "must hold a JSON object")
    (folder / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text('{"weight_map": []}')
    _refused(capsys, folder, "has no weight_map object")


# --- model configs -------------------------------------------------------------------------------------------------


def edit_json(path: Path, *keys_and_value) -> None:
    *keys, value = keys_and_value
    data = json.loads(path.read_text())
    target = data
    for key in keys[:-1]:
        target = target[key]
    target[keys[-1]] = value
    path.write_text(json.dumps(data))


NATIVE_CONFIGS = {
    "text encoder layers": (("text_encoder", "layers", 10**9), "text_encoder.layers must be 0 or more and at most"),
    "train timesteps": (("schedule", "num_train_timesteps", 10**10), "schedule.num_train_timesteps"),
    "channels": (("unet", "levels", 0, "channels", 10**9), "unet.levels\\[\\].channels"),
    "vae channels": (("vae", "block_out_channels", [10**9]), "vae.block_out_channels\\[0\\]"),
    "frames as a string": (("defaults", "frames", "16"), "defaults.frames must be an integer, not str '16'"),
    "layers_per_block as a string": (("unet", "layers_per_block", "2"), "unet.layers_per_block must be an integer"),
    "bool for an int": (("text_encoder", "heads", True), "text_encoder.heads must be an integer, not bool"),
    "NaN eps": (("vae", "scaling_factor", float("nan")), "vae.scaling_factor must be a finite number"),
    "beta of 1": (("schedule", "beta_end", 1.0), "less than 1"),
    "string for a bool": (("schedule", "zero_terminal_snr", "false"), "zero_terminal_snr must be true or false"),
    "attention as a string": (("unet", "levels", 0, "attention", "yes"), "attention must be true or false"),
    "height not a multiple of 8": (("defaults", "height", 100), "defaults.height must be a multiple of 8"),
    "section not an object": (("vae", [1, 2]), "vae must be a JSON object"),
    "too many parameters": (("text_encoder", "vocab_size", 999_999), None),
    "width and layers too big together": (("text_encoder", "mlp_width", 65536), None),
}


@pytest.mark.parametrize("case", list(NATIVE_CONFIGS))
def test_bad_model_json_is_refused_before_building(native_dir, tmp_path, capsys, case):
    folder = _copy(native_dir, tmp_path)
    edit, message = NATIVE_CONFIGS[case]
    if message is None:  # each value within its bounds, the whole too big: the parameter estimate refuses it
        edit_json(folder / "model.json", "text_encoder", "width", 65536)
        edit_json(folder / "model.json", "text_encoder", "layers", 256)
        message = "the text encoder would have [0-9,]+ parameters, more than the 20,000,000,000"
    edit_json(folder / "model.json", *edit)
    line = _refused(capsys, folder, message)
    assert "model.json: " in line
    _refused(capsys, folder, message, "generate")


DIFFUSERS_CONFIGS = {
    "sample_size": (("unet", "sample_size", "abc"), "unet/config.json: sample_size\\[0\\] must be an integer"),
    "sample_size too big": (("unet", "sample_size", 10**6), "unet/config.json: sample_size\\[0\\] must be 1 or more"),
    "layers_per_block": (("unet", "layers_per_block", "2"), "unet/config.json: layers_per_block must be an integer"),
    "channels": (("unet", "block_out_channels", [10**9, 10**9, 10**9]), "block_out_channels\\[0\\] must be 1 or"),
    "block types": (("unet", "down_block_types", [["x"]]), "down_block_types must be a list of block type names"),
    "text layers": (("text_encoder", "num_hidden_layers", 10**9), "text_encoder/config.json: num_hidden_layers"),
    "vocab": (("text_encoder", "vocab_size", 10**12), "text_encoder/config.json: vocab_size"),
    "vae layers": (("vae", "layers_per_block", 2.0), "vae/config.json: layers_per_block must be an integer"),
    "timesteps": (("scheduler", "num_train_timesteps", 10**10), "scheduler_config.json: num_train_timesteps"),
    "beta": (("scheduler", "beta_start", "0.1"), "scheduler_config.json: beta_start must be a finite number"),
    "zero snr": (("scheduler", "rescale_betas_zero_snr", "yes"), "rescale_betas_zero_snr must be true or false"),
}


@pytest.mark.parametrize("case", list(DIFFUSERS_CONFIGS))
def test_bad_diffusers_config_is_refused_before_building(diffusers_dir, tmp_path, capsys, case):
    folder = _copy(diffusers_dir, tmp_path)
    (component, *edit), message = DIFFUSERS_CONFIGS[case]
    name = "scheduler_config.json" if component == "scheduler" else "config.json"
    edit_json(folder / component / name, *edit)
    _refused(capsys, folder, message)


def _modelscope_folder(folder: Path, **changes) -> Path:
    """A ModelScope layout whose weights are empty files: every case below is refused before they are opened."""
    from tests.factories import MODELSCOPE_TINY_CFG

    folder.mkdir()
    for name in ("text2video_pytorch_model.pth", "open_clip_pytorch_model.bin", "VQGAN_autoencoder.pth"):
        (folder / name).write_bytes(b"")
    args = {"max_frames": 16, **changes.pop("args", {})}
    cfg = {**MODELSCOPE_TINY_CFG, **changes}
    (folder / "configuration.json").write_text(json.dumps({"model": {"model_args": args, "model_cfg": cfg}}))
    return folder


MODELSCOPE_CONFIGS = {
    "res blocks": ({"unet_res_blocks": "2"}, "configuration.json: unet_res_blocks must be an integer"),
    "dim": ({"unet_dim": 10**9}, "configuration.json: unet_dim must be 1 or more and at most"),
    "dim times mult": ({"unet_dim": 60000, "unet_dim_mult": [1, 2]}, "channels must be 1 or more and at most"),
    "attn scales": ({"unet_attn_scales": ["abc"]}, "unet_attn_scales\\[\\] must be a finite number"),
    "max frames": ({"args": {"max_frames": "16"}}, "model_args.max_frames must be an integer"),
    "absolute ckpt": ({"args": {"ckpt_unet": "/etc/passwd"}}, "ckpt_unet, '/etc/passwd', is not a file inside"),
    "dot-dot ckpt": ({"args": {"ckpt_clip": "../x.bin"}}, "ckpt_clip, '../x.bin', is not a file inside"),
}


@pytest.mark.parametrize("case", list(MODELSCOPE_CONFIGS))
def test_bad_modelscope_config_is_refused_before_reading(tmp_path, capsys, case):
    changes, message = MODELSCOPE_CONFIGS[case]
    folder = _modelscope_folder(tmp_path / "ms", **changes)
    _refused(capsys, folder, message)


def test_model_json_that_is_not_an_object(native_dir, tmp_path, capsys):
    folder = _copy(native_dir, tmp_path)
    (folder / "model.json").write_text("[1]")
    _refused(capsys, folder, "model.json must hold a JSON object, not a list")
    (folder / "model.json").write_text("[" * 100_000)
    _refused(capsys, folder, "model.json is not valid JSON: nested too deeply")
    os.truncate(folder / "model.json", 10**10)  # sparse: refused by its size, never read
    _refused(capsys, folder, "model.json is over 100,000,000 bytes")


# --- the parameter estimate ----------------------------------------------------------------------------------------


def _variants() -> dict[str, ModelConfig]:
    shapes = ModelConfig.from_dict(json.loads(BUNDLED_SHAPES.read_text()))
    unet = TINY.unet
    return {
        "full": PRESETS["full"],
        "tiny": TINY,
        "shapes": shapes,
        "one level, three layers": dataclasses.replace(
            TINY, unet=dataclasses.replace(unet, levels=(UNetLevel(16, False),), layers_per_block=3)
        ),
        "every shapes option": dataclasses.replace(
            TINY,
            unet=dataclasses.replace(unet, shapes=ShapesOptions(True, True, True, True, 2), in_channels=3),
            vae=dataclasses.replace(TINY.vae, block_out_channels=(8, 16), latent_channels=3, out_channels=1),
        ),
        "no text layers": dataclasses.replace(
            TINY, text_encoder=dataclasses.replace(TINY.text_encoder, layers=0, context_length=5)
        ),
    }


@pytest.mark.parametrize("name", list(_variants()))
def test_parameter_estimate_is_exact(name):
    config = _variants()[name]
    networks = build_networks(config)  # on the meta device: no memory
    counted = {n: sum(p.numel() for p in network.parameters()) for n, network in networks.items()}
    estimated = {name: getattr(config, name).parameter_count() for name in counted}
    assert estimated == counted


def test_the_cap_is_generous():
    full = PRESETS["full"]
    total = sum(sum(p.numel() for p in n.parameters()) for n in build_networks(full).values())
    assert total * 10 < sizes.MAX_PARAMETERS  # ten published models' worth still builds
    with pytest.raises(CinematicError, match="the UNet would have"):
        dataclasses.replace(full.unet, layers_per_block=32, levels=(UNetLevel(8192, True),) * 8, norm_groups=32)


# --- torch files: info reads what loading reads --------------------------------------------------------------------


@pytest.fixture
def bin_dir(diffusers_dir, tmp_path) -> Path:
    """The diffusers folder with its text encoder as a pre-1.6 (legacy, non-zip) pickle file."""
    from safetensors.torch import load_file

    folder = _copy(diffusers_dir, tmp_path, "bin")
    state = load_file(str(folder / "text_encoder" / "model.safetensors"))
    (folder / "text_encoder" / "model.safetensors").unlink()
    torch.save(state, folder / "text_encoder" / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    return folder


def test_info_accepts_a_legacy_bin_that_loading_accepts(bin_dir, capsys):
    assert load(bin_dir).format == "diffusers"
    code, lines, _ = _run(capsys, "info", str(bin_dir))
    assert code == 0, lines


class _Payload:
    def __reduce__(self):
        return (open, ("/nonexistent/never-created", "w"))


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_weights_only_refusal_names_the_blocked_global(bin_dir, capsys, legacy):
    path = bin_dir / "text_encoder" / "pytorch_model.bin"
    torch.save({"x": torch.zeros(1), "payload": _Payload()}, path, _use_new_zipfile_serialization=not legacy)
    for command in ("info", "generate"):
        line = _refused(capsys, bin_dir, r"refusing to load .*pytorch_model\.bin", command)
        assert re.search(r"its pickle calls (io|builtins)\.open, which weights-only loading does not allow", line)
