"""Loading every published layout: the networks come out equal to the references that wrote the files."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from cinematic.errors import CinematicError
from cinematic.weights import convert, load
from tests.factories import (
    add_text_model_prefix,
    diffusers_components,
    make_diffusers_folder,
    make_modelscope_folder,
)

PROMPTS = ["a red cat riding a horse", ""]


@pytest.fixture(scope="module")
def diffusers_dir(tmp_path_factory) -> Path:
    return make_diffusers_folder(tmp_path_factory.mktemp("dif") / "model")


@pytest.fixture(scope="module")
def modelscope_dir(tmp_path_factory) -> Path:
    return make_modelscope_folder(tmp_path_factory.mktemp("ms") / "model")


def run_networks(model, seed: int = 0) -> dict[str, torch.Tensor]:
    """One forward of each network on fixed inputs, in float32."""
    g = torch.Generator().manual_seed(seed)
    tokens = model.tokenizer(PROMPTS)
    context = model.text_encoder(tokens)
    unet = model.unet
    x = torch.randn(2, unet.config.in_channels, 3, 8, 8, generator=g).to(unet.dtype)
    eps = model.unet(x, torch.tensor([10, 500]), context)
    frames = model.vae.decode_video(x[:1], chunk=2)
    return {"context": context.float(), "eps": eps.float(), "frames": frames.float()}


def reference_outputs(components: dict, tokenizer_ids: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        context = components["text_encoder"](tokenizer_ids)[0]
        x = torch.randn(2, 4, 3, 8, 8, generator=g)
        eps = components["unet"](x, torch.tensor([10, 500]), encoder_hidden_states=context).sample
        z = x[:1].permute(0, 2, 1, 3, 4).flatten(0, 1) / components["vae"].config.scaling_factor
        frames = components["vae"].decode(z).sample.unflatten(0, (1, 3)).permute(0, 2, 1, 3, 4)
    return {"context": context, "eps": eps, "frames": frames}


@pytest.mark.parametrize(
    "safe,variant,prefix,tokenizer_json",
    [
        (True, None, False, True),
        (True, None, True, False),
        (False, None, True, False),
        (True, "fp16", False, False),
        (False, "fp16", True, True),
    ],
    ids=["safetensors-tf5", "safetensors-tf4", "bin-tf4", "fp16-safetensors", "fp16-bin-tf4-keys-tf5-tokenizer"],
)
def test_diffusers_layout_matches_reference(tmp_path, safe, variant, prefix, tokenizer_json):
    folder = make_diffusers_folder(tmp_path / "model", safe, variant, tokenizer_json)
    if prefix:
        add_text_model_prefix(folder)
    ref = diffusers_components(tmp_path / "model-vocab")
    if variant == "fp16":  # the reference sees the same fp16-rounded weights, computed in fp32
        for name in ("unet", "vae", "text_encoder"):
            ref[name].half().float()
    model = load(folder, dtype=torch.float32, variant=variant)
    assert model.format == "diffusers"
    with torch.no_grad():
        ours = run_networks(model)
    ids = ref["tokenizer"](PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert torch.equal(model.tokenizer(PROMPTS), ids.input_ids)
    expected = reference_outputs(ref, ids.input_ids)
    for key in ours:
        torch.testing.assert_close(ours[key], expected[key], rtol=1e-5, atol=1e-5, msg=key)


def test_modelscope_layout_loads_converted_weights(modelscope_dir):
    from cinematic.weights.ldm_vae import convert_ldm_vae, strip_first_stage
    from cinematic.weights.modelscope_unet import convert_modelscope_unet
    from cinematic.weights.openclip import convert_openclip_text
    from cinematic.weights.pickle_safe import load_checkpoint

    model = load(modelscope_dir)
    assert model.format == "modelscope"
    assert model.config.text_encoder.layers == 2  # three stored resblocks, the last one unused
    assert model.config.defaults.frames == 16  # max_frames of configuration.json

    def read(name):
        return torch.load(modelscope_dir / name, weights_only=True)

    expected = {
        "unet": convert_modelscope_unet(read("text2video_pytorch_model.pth"), model.config.unet),
        "text_encoder": convert_openclip_text(read("open_clip_pytorch_model.bin"), layers=2),
        "vae": convert_ldm_vae(
            strip_first_stage(load_checkpoint(modelscope_dir / "VQGAN_autoencoder.pth")["state_dict"])
        ),
    }
    for name, state in expected.items():
        ours = getattr(model, name).state_dict()
        assert ours.keys() == state.keys()
        for key in state:
            assert torch.equal(ours[key], state[key]), f"{name}.{key}"


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_modelscope_to_cinematic_is_bitwise_equal(modelscope_dir, tmp_path, dtype):
    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16}[dtype]
    out = convert(modelscope_dir, tmp_path / "converted", dtype=torch_dtype)
    direct, converted = load(modelscope_dir, dtype=torch_dtype), load(out, dtype=torch_dtype)
    assert converted.format == "cinematic" and converted.config == direct.config
    for name in ("unet", "text_encoder", "vae"):
        a, b = getattr(direct, name).state_dict(), getattr(converted, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    if dtype == "fp32":
        with torch.no_grad():
            x, y = run_networks(direct), run_networks(converted)
        for key in x:
            assert torch.equal(x[key], y[key]), key


def test_weights_in_the_files_dtype_are_a_private_map_of_the_file(modelscope_dir, tmp_path):
    folder = convert(modelscope_dir, tmp_path / "fp16", dtype=torch.float16)
    unet_file = folder / "unet.safetensors"
    before = unet_file.read_bytes()
    mapped, copied = load(folder, dtype=torch.float16), load(folder, dtype=torch.float32)
    weights = dict(mapped.unet.named_parameters())
    assert len({p.untyped_storage().data_ptr() for p in weights.values()}) == 1  # views of one map, no copies
    assert len({p.untyped_storage().data_ptr() for p in copied.unet.parameters()}) == len(weights)
    expected = copied.unet.state_dict()
    assert all(torch.equal(value.float(), expected[key]) for key, value in weights.items())
    with torch.no_grad():
        weights["conv_in.weight"].add_(1.0)  # as merging a LoRA does: copy-on-write, the file stays as it was
    assert unet_file.read_bytes() == before
    again = load(folder, dtype=torch.float16).unet.conv_in.weight
    assert torch.equal(again.float(), expected["conv_in.weight"])


def test_load_casts_to_requested_dtype(diffusers_dir):
    model = load(diffusers_dir, dtype=torch.bfloat16)
    for name in ("unet", "text_encoder", "vae"):
        assert {p.dtype for p in getattr(model, name).parameters()} == {torch.bfloat16}
    with torch.no_grad():
        out = run_networks(model)
    assert all(torch.isfinite(v).all() for v in out.values())


def test_lightning_checkpoint_needs_no_lightning(modelscope_dir):
    from cinematic.weights.pickle_safe import StandIn, load_checkpoint

    assert importlib.util.find_spec("pytorch_lightning") is None
    checkpoint = load_checkpoint(modelscope_dir / "VQGAN_autoencoder.pth")
    assert checkpoint["epoch"] == 3
    callbacks = checkpoint["callbacks"]
    ((key, value),) = callbacks.items()
    assert issubclass(key, StandIn) and isinstance(value, StandIn)
    assert "ModelCheckpoint" in repr(value)
    assert any(k.startswith("first_stage_model.") for k in checkpoint["state_dict"])


class _CreatesFile:
    """Unpickling this calls open(path, "w"), which would create the file."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("name", ["text2video_pytorch_model.pth", "VQGAN_autoencoder.pth"])
def test_malicious_pickle_is_refused(modelscope_dir, tmp_path, name):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(modelscope_dir, folder)
    marker = tmp_path / "pwned.txt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": _CreatesFile(str(marker))}, folder / name)
    with pytest.raises(CinematicError, match="refusing to load"):
        load(folder)
    assert not marker.exists()


@pytest.mark.parametrize("hostile", [False, True], ids=["plain", "hostile"])
def test_legacy_format_lightning_checkpoint(modelscope_dir, tmp_path, hostile):
    """A pre-1.6 (non-zip) VQGAN_autoencoder.pth cannot be memory-mapped: it is read whole through the same
    restricted unpickler, so it loads, and a hostile one is refused as in the zip format. Found by
    benchmarks/probe.py, where the legacy files were refused only because mmap failed on them."""
    import shutil

    from tests.factories import lightning_checkpoint, modelscope_vae, save_lightning_checkpoint

    folder = Path(shutil.copytree(modelscope_dir, tmp_path / "model"))
    path, marker = folder / "VQGAN_autoencoder.pth", tmp_path / "pwned.txt"
    if hostile:
        checkpoint = {"state_dict": {"x": torch.zeros(1)}, "payload": _CreatesFile(str(marker))}
        torch.save(checkpoint, path, _use_new_zipfile_serialization=False)
        with pytest.raises(CinematicError, match="refusing to load .*VQGAN_autoencoder.pth"):
            load(folder)
        assert not marker.exists()
        return
    torch.manual_seed(0)
    save_lightning_checkpoint(lightning_checkpoint(modelscope_vae().state_dict()), path, legacy=True)
    assert not zipfile.is_zipfile(path)
    expected = load(modelscope_dir).vae.state_dict()
    for key, value in load(folder).vae.state_dict().items():
        assert value.shape == expected[key].shape, key


def _native_copy(diffusers_dir: Path, tmp_path: Path) -> Path:
    return convert(diffusers_dir, tmp_path / "native", dtype=torch.float32)


def _edit_unet(folder: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    path = folder / "unet.safetensors"
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path))


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda s: s.pop("conv_in.weight"), "missing keys: conv_in.weight"),
        (lambda s: s.__setitem__("extra.weight", torch.zeros(2)), "unexpected keys: extra.weight"),
        (lambda s: s.__setitem__("conv_in.bias", torch.zeros(7)), r"wrong shapes: conv_in.bias \(7,\)"),
    ],
    ids=["missing", "unexpected", "shape"],
)
def test_strict_loading_names_the_keys(diffusers_dir, tmp_path, edit, message):
    folder = _native_copy(diffusers_dir, tmp_path)
    _edit_unet(folder, edit)
    with pytest.raises(CinematicError, match=message):
        load(folder)


def test_convert_refuses_non_empty_destination(diffusers_dir, tmp_path):
    dst = tmp_path / "taken"
    dst.mkdir()
    (dst / "file").write_text("x")
    with pytest.raises(CinematicError, match="not empty"):
        convert(diffusers_dir, dst)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # no temporary folder left behind


def offline_hub(monkeypatch, cache: Path) -> None:
    """No network and the given cache; huggingface_hub reads these at import time, so patch its constants too."""
    import huggingface_hub.constants as constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))


def test_modelscope_without_tokenizer_says_where_to_get_one(tmp_path, monkeypatch):
    offline_hub(monkeypatch, tmp_path / "empty-cache")
    folder = make_modelscope_folder(tmp_path / "model", with_tokenizer=False)
    with pytest.raises(CinematicError, match="no tokenizer.*--tokenizer"):
        load(folder)
    model = load(folder, tokenizer=tmp_path / "model-vocab")
    assert model.tokenizer("a cat").shape == (1, 77)
    # With the vocabulary in the Hugging Face cache, it comes from there, still without any network.
    from cinematic.weights.hub import TOKENIZER_REPO
    from tests.clip_vocab import write_tiny_clip_vocab

    repo = tmp_path / "vocab-repo"
    write_tiny_clip_vocab(repo / "tokenizer")
    offline_hub(monkeypatch, tmp_path / "cache")
    _populate_hub_cache(tmp_path / "cache", TOKENIZER_REPO, repo)
    assert torch.equal(load(folder).tokenizer("a cat"), model.tokenizer("a cat"))


def _populate_hub_cache(cache: Path, repo_id: str, source: Path) -> Path:
    """Lay out a folder the way huggingface_hub caches a snapshot: models--owner--name/{refs,snapshots}."""
    import shutil

    revision = "0" * 40
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    shutil.copytree(source, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot


@pytest.mark.parametrize("name", ["ali-vilab/text-to-video-ms-1.7b", "damo-vilab/text-to-video-ms-1.7b"])
def test_hub_id_resolves_from_offline_cache(diffusers_dir, tmp_path, monkeypatch, name):
    cache = tmp_path / "hub"
    _populate_hub_cache(cache, "ali-vilab/text-to-video-ms-1.7b", diffusers_dir)
    offline_hub(monkeypatch, cache)
    model = load(name)
    assert model.format == "diffusers"
    assert sum(p.numel() for p in model.unet.parameters()) > 0


def test_hub_allow_patterns_prefer_fp16_safetensors():
    from cinematic.weights.hub import allow_patterns

    files = [
        "model_index.json", "scheduler/scheduler_config.json", "tokenizer/vocab.json", "tokenizer/merges.txt",
        "unet/config.json", "unet/diffusion_pytorch_model.bin", "unet/diffusion_pytorch_model.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors", "unet/diffusion_pytorch_model.fp16.bin",
        "vae/config.json", "vae/diffusion_pytorch_model.bin", "text_encoder/config.json",
        "text_encoder/pytorch_model.bin", "text_encoder/model.fp16.safetensors",
        "zs2_576w/text2video_pytorch_model.pth",
    ]  # fmt: skip
    patterns = allow_patterns(files)
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in patterns
    assert "text_encoder/model.fp16.safetensors" in patterns
    assert "vae/diffusion_pytorch_model.bin" in patterns
    assert not any(p.endswith("pytorch_model.bin") and p.startswith(("unet", "text_encoder")) for p in patterns)
    assert not any("zs2_576w" in p for p in patterns)


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cinematic", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=120,
    )


def _unet_config_edit(folder: Path, **changes) -> None:
    path = folder / "unet" / "config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, **changes}))


def test_bad_input_gives_one_line_and_exit_code_2(diffusers_dir, tmp_path):
    import shutil

    cases: dict[str, tuple[list[str], str]] = {}
    cases["missing path"] = (["info", str(tmp_path / "nope")], "no such model")
    (tmp_path / "empty").mkdir()
    cases["unknown layout"] = (["info", str(tmp_path / "empty")], "no known layout")
    truncated = _native_copy(diffusers_dir, tmp_path)
    data = (truncated / "vae.safetensors").read_bytes()
    (truncated / "vae.safetensors").write_bytes(data[: len(data) // 2])
    cases["truncated safetensors"] = (["convert", str(truncated), str(tmp_path / "out1")], "not a valid safetensors")
    bad_arch = tmp_path / "bad-arch"
    shutil.copytree(diffusers_dir, bad_arch)
    _unet_config_edit(bad_arch, act_fn="gelu")
    cases["unsupported config"] = (["info", str(bad_arch)], "act_fn='gelu' is not supported")
    unknown_key = tmp_path / "unknown-key"
    shutil.copytree(diffusers_dir, unknown_key)
    _unet_config_edit(unknown_key, use_linear_projection=False)
    cases["unknown config key"] = (["info", str(unknown_key)], "unknown config keys")
    offline = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty-cache")}
    for name, (args, message) in cases.items():
        result = _cli(*args)
        assert result.returncode == 2, (name, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (name, result.stderr)
    result = _cli("info", "nobody/no-such-model", env=offline)
    assert result.returncode == 2 and "not in the local Hugging Face cache" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out1").exists()


def test_cli_info_and_convert(diffusers_dir, tmp_path, capsys):
    from cinematic.cli import main

    assert main(["info", str(diffusers_dir)]) == 0
    out = capsys.readouterr().out
    assert "format:  diffusers" in out
    unet_params = sum(p.numel() for p in load(diffusers_dir).unet.parameters())
    assert f"{unet_params:,}" in out and "float32" in out
    assert main(["convert", str(diffusers_dir), str(tmp_path / "fast"), "--dtype", "bf16"]) == 0
    assert main(["info", str(tmp_path / "fast")]) == 0
    out = capsys.readouterr().out
    assert "format:  cinematic" in out and "bfloat16" in out


def test_help_is_fast_and_light():
    code = "import sys, cinematic.cli; cinematic.cli.build_parser(); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "False"
