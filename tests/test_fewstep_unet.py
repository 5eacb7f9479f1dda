"""The few-step students' side of the UNet: the guidance embedding against diffusers' (diffusers==0.42.1), T2V-Turbo's
ordered ``unet_lora.pt`` and MCM's PEFT LoRAs (peft==0.21.2) against their references, merged and unmerged, their
one-line errors, hub ids from the local cache, and the sampler defaults they bring.

The T2V-Turbo reference is its own LoRA injection (``Ji4chenLi/t2v-turbo``, ``utils/lora.py``) rebuilt here from its
description: every module of the UNet whose class is exactly ``nn.Linear``, ``nn.Conv2d`` or ``nn.Conv3d``, in
``named_modules()`` order, wrapped as ``layer(x) + up(down(x))`` at scale 1, rank capped at ``min(in, out)``, a
convolution's ``down`` with the layer's kernel and ``up`` 1x1; the file is ``torch.save`` of ``[up0, down0, ...]``.
Its UNet is diffusers' ``UNet3DConditionModel`` here. T2V-Turbo's own ``model_scope/unet_3d_condition.py`` registers
the same modules in the same order (conv_in, time_proj, time_embedding with linear_1, cond_proj, linear_2,
transformer_in, the down_blocks and up_blocks ModuleLists, then mid_block, conv_norm_out, conv_out; inside the blocks
resnets, temp_convs, attentions, temp_attentions, then the down/upsamplers), read from the repository at eaae323.

Everything runs tiny models on the CPU, in seconds.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from cinematic.errors import CinematicError
from cinematic.lora_loading import FEW_STEP_DEFAULTS, MCM, OTHER, T2V_TURBO, load_lora, lora_file, unload_lora
from cinematic.models import lora_adapters, modifications
from cinematic.models.unet3d import UNET_TINY, UNet3D
from cinematic.models.unet3d_blocks import guidance_embedding
from cinematic.weights.turbo_lora import reference_layers
from tests.test_unet3d import diffusers_unet, inputs, randomize_

TOL = {"rtol": 1e-5, "atol": 1e-5}
GUIDED = dataclasses.replace(UNET_TINY, time_cond_proj_dim=256)
REFERENCE_KINDS = (nn.Linear, nn.Conv2d, nn.Conv3d)
W = torch.tensor([7.5, 3.0])


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def diffusers_w_embedding(w: torch.Tensor, dim: int = 256) -> torch.Tensor:
    """diffusers' own guidance-scale embedding (the method uses nothing of its pipeline)."""
    from diffusers import LatentConsistencyModelPipeline

    return LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)


def reference_and_ours(config=GUIDED, seed: int = 0):
    torch.manual_seed(seed)
    ref = randomize_(diffusers_unet(config))
    ours = UNet3D(config)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours.eval()


# --- the guidance embedding -----------------------------------------------------------------------------------


def test_guidance_embedding_matches_diffusers():
    for w in (torch.tensor([0.0, 1.0, 7.5, 15.0]), torch.linspace(2, 14, 5)):
        for dim in (256, 7):
            torch.testing.assert_close(guidance_embedding(w, dim), diffusers_w_embedding(w, dim), rtol=0, atol=1e-6)
    ref, ours = reference_and_ours()
    torch.manual_seed(1)
    x, t, context = inputs(GUIDED, 2, 3, 8, 8)
    with torch.no_grad():
        expected = ref(x, t, context, timestep_cond=diffusers_w_embedding(W)).sample
        actual = ours(x, t, context, guidance=W)
        torch.testing.assert_close(actual, expected, **TOL)
        # A scalar w is every video's; without one, cond_proj is skipped as diffusers skips it without timestep_cond.
        same = torch.full((2,), 7.5)
        torch.testing.assert_close(ours(x, t, context, guidance=7.5), ours(x, t, context, guidance=same))
        torch.testing.assert_close(ours(x, t, context), ref(x, t, context).sample, **TOL)
        assert not torch.allclose(actual, ours(x, t, context, guidance=1.0), **TOL)


def test_guidance_embedding_config_counts_saves_and_refuses(tmp_path: Path):
    from cinematic.models.components import ModelConfig
    from cinematic.models.presets import PRESETS
    from cinematic.weights.diffusers_layout import parse_unet_config

    ours = UNet3D(GUIDED)
    assert GUIDED.parameter_count() == sum(p.numel() for p in ours.parameters())
    assert "time_embedding.cond_proj.weight" in ours.state_dict()
    assert "time_cond_proj_dim" not in UNET_TINY.to_dict()  # a base model's stored config is as before
    model = dataclasses.replace(PRESETS["tiny"], unet=GUIDED)
    assert ModelConfig.from_dict(json.loads(json.dumps(model.to_dict()))).unet == GUIDED
    diffusers_unet(GUIDED).save_config(tmp_path)  # the config.json a diffusers student ships
    assert parse_unet_config(json.loads((tmp_path / "config.json").read_text()), tmp_path) == GUIDED
    for bad in (0, "256", 1.5):
        with pytest.raises(CinematicError, match="time_cond_proj_dim"):
            dataclasses.replace(UNET_TINY, time_cond_proj_dim=bad)
    x, t, context = inputs(UNET_TINY, 1, 2, 8, 8)
    with pytest.raises(CinematicError, match="no guidance embedding"):
        UNet3D(UNET_TINY)(x, t[:1], context, guidance=7.5)


# --- T2V-Turbo's unet_lora.pt ---------------------------------------------------------------------------------


class ReferenceLoRA(nn.Module):
    """An injected layer as T2V-Turbo's LoraInjectedLinear / Conv2d / Conv3d compute it: ``base(x) + up(down(x))``."""

    def __init__(self, base: nn.Module, rank: int, generator: torch.Generator):
        super().__init__()
        self.base = base
        if isinstance(base, nn.Linear):
            self.down = nn.Linear(base.in_features, rank, bias=False)
            self.up = nn.Linear(rank, base.out_features, bias=False)
        else:
            kind, n_in, n_out = type(base), base.in_channels, base.out_channels
            self.down = kind(n_in, rank, base.kernel_size, base.stride, base.padding, base.dilation, bias=False)
            self.up = kind(rank, n_out, 1, bias=False)
        with torch.no_grad():
            for p in (self.down.weight, self.up.weight):
                p.copy_(torch.randn(p.shape, generator=generator) / p[0].numel() ** 0.5 * 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.up(self.down(x))


def reference_layer_names(unet: nn.Module) -> list[str]:
    return [name for name, m in unet.named_modules() if type(m) in REFERENCE_KINDS]


def inject_reference_lora(unet: nn.Module, rank: int, seed: int = 0) -> list[torch.Tensor]:
    """Wrap every layer of the reference order, in that order; returns the file's list ``[up0, down0, ...]``."""
    generator = torch.Generator().manual_seed(seed)
    tensors = []
    for name in reference_layer_names(unet):
        layer = unet.get_submodule(name)
        n_in, n_out = (layer.in_features, layer.out_features) if type(layer) is nn.Linear else (
            layer.in_channels, layer.out_channels)  # fmt: skip
        wrapped = ReferenceLoRA(layer, min(rank, n_in, n_out), generator)
        parent, _, child = name.rpartition(".")
        setattr(unet.get_submodule(parent), child, wrapped)
        tensors += [wrapped.up.weight.detach().clone(), wrapped.down.weight.detach().clone()]
    return tensors


def test_our_layer_order_is_the_references():
    ref, ours = reference_and_ours()
    names = reference_layer_names(ref)
    assert list(reference_layers(ours)) == names
    assert "time_embedding.cond_proj" in names and any(".temp_convs." in n for n in names)  # Conv3d: FrameConv
    # up_blocks before mid_block, as the reference registers them
    assert names.index("up_blocks.0.resnets.0.conv1") < names.index("mid_block.resnets.0.conv1")


def test_full_size_order_and_the_published_files_shapes():
    """At the published size (on the meta device): the same order as diffusers', and the shapes the published
    ``unet_lora.pt`` holds (rank 32; conv_in and conv_out capped at 4)."""
    from cinematic.models.unet3d import UNET_FULL

    full = dataclasses.replace(UNET_FULL, time_cond_proj_dim=256)
    with torch.device("meta"):
        ours, ref = UNet3D(full), diffusers_unet(full)
    layers = reference_layers(ours)
    assert list(layers) == reference_layer_names(ref)
    shapes = {n: lora_adapters.pair_shapes(n, m, min(32, *lora_adapters.features(n, m))) for n, m in layers.items()}
    assert len(layers) == 575  # so the published list holds 1150 tensors
    assert shapes["conv_in"] == ((4, 4, 3, 3), (320, 4, 1, 1))
    assert shapes["time_embedding.cond_proj"] == ((32, 256), (320, 32))
    assert shapes["down_blocks.0.temp_convs.0.conv1.2"] == ((32, 320, 3, 1, 1), (320, 32, 1, 1, 1))


@pytest.mark.parametrize("merge", [False, True])
@pytest.mark.parametrize("base_has_embedding", [True, False])
def test_turbo_lora_matches_the_reference(tmp_path: Path, merge: bool, base_has_embedding: bool):
    """The list loads onto our UNet, merged or not, and gives the injected reference's output. On a base model without
    the guidance embedding, loading adds one with a zero cond_proj: the reference with its cond_proj zeroed."""
    ref, ours = reference_and_ours()
    if not base_has_embedding:
        with torch.no_grad():
            ref.time_embedding.cond_proj.weight.zero_()
        state = {k: v for k, v in ref.state_dict().items() if not k.startswith("time_embedding.cond_proj")}
        ours = UNet3D(UNET_TINY).eval()
        ours.load_state_dict(state, strict=True)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    path = tmp_path / "unet_lora.pt"
    torch.save(inject_reference_lora(ref, rank=8), path)
    name = load_lora(ours, path, merge=merge)
    assert ours.config.time_cond_proj_dim == 256
    x, t, context = inputs(GUIDED, 2, 3, 8, 8)
    with torch.no_grad():
        expected = ref(x, t, context, timestep_cond=diffusers_w_embedding(W)).sample
        torch.testing.assert_close(ours(x, t, context, guidance=W), expected, **TOL)
    unload_lora(ours, name)  # the model is exactly as it was, the added embedding gone too
    assert modifications.active(ours) == []
    assert ours.config.time_cond_proj_dim == (256 if base_has_embedding else None)
    after = ours.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def turbo_case(tmp_path: Path, edit) -> tuple[UNet3D, Path]:
    """A correct list for a tiny UNet, changed by ``edit``, saved."""
    ref, ours = reference_and_ours()
    tensors = inject_reference_lora(ref, rank=8)
    path = tmp_path / "unet_lora.pt"
    torch.save(edit(tensors), path)
    return ours, path


BAD_LISTS = {
    "truncated": (lambda ts: ts[:-2], r"ends before layer conv_out is complete"),
    "half a pair": (lambda ts: ts[:-1], r"ends before layer conv_out is complete"),
    "an extra tensor": (lambda ts: [*ts, ts[-1]], r"1 more than the .* whose last is conv_out"),
    "an inserted tensor": (lambda ts: [*ts[:10], ts[3], *ts[10:]], r"layer transformer_in\.\S+ \(Linear"),
    "one wrong shape": (lambda ts: [*ts[:6], ts[6][:, :-1], *ts[7:]], r"tensors 6 and 7 .* layer time_embedding"),
}


@pytest.mark.parametrize("case", list(BAD_LISTS))
def test_bad_turbo_lists_are_one_line_naming_the_layer(tmp_path: Path, case: str):
    edit, message = BAD_LISTS[case]
    ours, path = turbo_case(tmp_path, edit)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.raises(CinematicError, match=message) as error:
        load_lora(ours, path)
    assert "\n" not in str(error.value)
    assert modifications.active(ours) == [] and ours.state_dict().keys() == before.keys()  # nothing half-loaded


class Payload:
    """Any class but a tensor's: unpickling it would run code."""


def test_turbo_files_are_read_without_unpickling_code(tmp_path: Path):
    ours = UNet3D(UNET_TINY)
    path = tmp_path / "unet_lora.pt"
    torch.save({"up": torch.zeros(1)}, path)
    with pytest.raises(CinematicError, match="not a T2V-Turbo LoRA: expected a list of tensors"):
        load_lora(ours, path)
    torch.save([torch.zeros(1), Payload()], path)  # an object of a class: refused, never built
    with pytest.raises(CinematicError, match="cannot read .* as a T2V-Turbo LoRA"):
        load_lora(ours, path)
    assert modifications.active(ours) == []


# --- MCM's PEFT LoRAs -----------------------------------------------------------------------------------------

# MCM's main.py: these module-name endings, less the temporal convolutions (PEFT had no Conv3d then).
MCM_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
               "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")  # fmt: skip


def write_mcm_lora(folder: Path, seed: int = 0):
    """A PEFT LoRA as MCM trains and saves one (get_peft_model over diffusers' UNet, save_pretrained), its up
    matrices random too; returns the PEFT model (the reference) and our UNet with the same base weights."""
    from peft import LoraConfig, get_peft_model

    ref, ours = reference_and_ours(UNET_TINY, seed)
    targets = [n for n, _ in ref.named_modules() if n.endswith(MCM_TARGETS) and not ("temp" in n and "conv" in n)]
    peft_model = get_peft_model(ref, LoraConfig(r=4, lora_alpha=6, target_modules=targets, lora_dropout=0.0))
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator) / p[0].numel() ** 0.5 * 0.5)
    peft_model.save_pretrained(folder)
    return peft_model.eval(), ours


@pytest.mark.parametrize("merge", [False, True])
def test_mcm_lora_matches_peft(tmp_path: Path, merge: bool):
    folder = tmp_path / "modelscopet2v-webvid"
    peft_model, ours = write_mcm_lora(folder)
    assert {p.name for p in folder.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    assert lora_file(folder) == (folder / "adapter_model.safetensors", MCM)
    name = load_lora(ours, folder, merge=merge)
    adapted = lora_adapters.adapters_of(ours, name)
    assert any(isinstance(a.down, nn.Conv2d) for a in adapted.values())  # resnet convolutions take conv adapters
    x, t, context = inputs(UNET_TINY, 2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, context), peft_model(x, t, context).sample, **TOL)


def test_bad_mcm_loras_are_one_line_naming_the_layer(tmp_path: Path):
    folder = tmp_path / "modelscopet2v-webvid"
    _, ours = write_mcm_lora(folder)
    file = folder / "adapter_model.safetensors"
    good = load_file(file)
    layer = "down_blocks.0.resnets.0.conv1"
    key = f"base_model.model.{layer}.lora_A.weight"
    cases = {
        "truncated": ({k: v for k, v in good.items() if k != key}, f"layer {layer} has a down or an up"),
        "extra": (
            {**good, **{k.replace(layer, "nowhere.conv1"): v.clone() for k, v in good.items() if layer in k}},
            "lacks: nowhere.conv1",
        ),  # fmt: skip
        "wrong shape": ({**good, key: good[key][:, :, :2].contiguous()}, f"{layer} has shapes"),
    }
    for state, message in cases.values():
        save_file(state, str(file))
        with pytest.raises(CinematicError, match=message) as error:
            load_lora(ours, folder)
        assert "\n" not in str(error.value) and modifications.active(ours) == []
    # A PEFT folder under another name is a plain LoRA: it brings no sampler settings.
    shutil.copytree(folder, tmp_path / "style")
    assert lora_file(tmp_path / "style")[1] == OTHER


# --- by file, folder or hub id, and the sampler defaults -------------------------------------------------------


def test_few_step_loras_by_hub_id_set_and_restore_the_sampler_defaults(tmp_path: Path, monkeypatch):
    """T2V-Turbo-MS and MCM resolve from the local hub cache (no network) and bring their sampler settings; unloading
    gives the model's own back."""
    from cinematic.models.presets import PRESETS
    from cinematic.pipeline import Pipeline
    from cinematic.train.setup import fresh_model
    from tests.test_loaders import _populate_hub_cache, offline_hub

    model = fresh_model(PRESETS["tiny"], ["a red circle"], None, seed=0)
    pipe = Pipeline(model, "cpu", torch.float32)
    turbo_repo, mcm_repo = tmp_path / "turbo", tmp_path / "mcm"
    turbo_repo.mkdir()
    torch.save(turbo_list_for(model.unet), turbo_repo / "unet_lora.pt")
    write_mcm_lora(mcm_repo / "modelscopet2v-laion")
    offline_hub(monkeypatch, tmp_path / "hub")
    _populate_hub_cache(tmp_path / "hub", "jiachenli-ucsb/T2V-Turbo-MS", turbo_repo)
    _populate_hub_cache(tmp_path / "hub", "yhzhai/mcm", mcm_repo)
    own = model.config.defaults
    with pytest.raises(CinematicError, match="several LoRAs; name one: yhzhai/mcm/modelscopet2v-laion"):
        pipe.load_lora("yhzhai/mcm")
    for hub_id, kind in (("jiachenli-ucsb/T2V-Turbo-MS", T2V_TURBO), ("yhzhai/mcm/modelscopet2v-laion", MCM)):
        name = pipe.load_lora(hub_id)
        defaults = pipe.model.config.defaults
        assert {k: getattr(defaults, k) for k in FEW_STEP_DEFAULTS[kind]} == FEW_STEP_DEFAULTS[kind]
        assert pipe.model.config.unet.time_cond_proj_dim == (256 if kind == T2V_TURBO else None)
        pipe.unload_lora(name)
        assert pipe.model.config.defaults == own and pipe.model.config.unet.time_cond_proj_dim is None


def turbo_list_for(unet: UNet3D, rank: int = 8) -> list[torch.Tensor]:
    """Random tensors of the right shapes for ``unet`` (given the guidance embedding a T2V-Turbo student has)."""
    from cinematic.models.unet3d import add_guidance_embedding

    generator = torch.Generator().manual_seed(0)
    added = add_guidance_embedding(unet, 256)
    tensors = []
    for name, layer in reference_layers(unet).items():
        n_in, n_out = lora_adapters.features(name, layer)
        down, up = lora_adapters.pair_shapes(name, layer, min(rank, n_in, n_out))
        tensors += [torch.randn(up, generator=generator) * 0.01, torch.randn(down, generator=generator) * 0.01]
    modifications.undo(unet, added)
    return tensors


def test_cli_bad_turbo_lora_is_one_line_and_writes_nothing(tmp_path: Path, capsys):
    from cinematic.cli import main
    from cinematic.models.presets import PRESETS
    from cinematic.train.setup import fresh_model
    from cinematic.weights.native import write_native

    model = fresh_model(PRESETS["tiny"], ["a red circle"], None, seed=0)
    tokenizer = model.tokenizer.save(tmp_path / "tokenizer")
    states = {name: (lambda n=name: getattr(model, n).state_dict()) for name in ("unet", "text_encoder", "vae")}
    base = write_native(tmp_path / "model", model.config, states, tokenizer, torch.float32)
    tensors = turbo_list_for(model.unet)
    bad = tmp_path / "unet_lora.pt"
    torch.save([*tensors[:20], tensors[20][:1], *tensors[21:]], bad)
    out = tmp_path / "clip.mp4"
    args = ["generate", "a red circle", "--model", str(base), "--num-frames", "2", "--seed", "1", "-o", str(out)]
    assert main([*args, "--lora", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tensors 20 and 21 are the up and down of layer" in err[0]
    assert not out.exists()
