"""The one mechanism for inference-time changes (cinematic.models.modifications): every change is listed, undoing it
gives back the network bit for bit (weights, their dtypes and the forward's output), and each declares whether a
compiled or recorded plain forward still computes the changed network."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from cinematic.models import feature_cache, freeu, lora_adapters, modifications, winograd
from cinematic.models.layers import checkpoint_gradients, chunk_feed_forwards
from cinematic.models.precision import compute_in, quantize_int8
from cinematic.models.unet3d import UNET_TINY, UNet3D
from tests.test_unet3d import inputs, randomize_

SRC = Path(__file__).resolve().parents[1] / "src" / "cinematic"


@pytest.fixture
def unet() -> UNet3D:
    torch.manual_seed(0)
    return randomize_(UNet3D(UNET_TINY)).eval()


def snapshot(network: nn.Module) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Every state-dict entry (a copy) and the output for fixed inputs."""
    torch.manual_seed(1)
    x, t, context = inputs(UNET_TINY, 2, 3, 8, 8)
    with torch.no_grad():
        out = network(x.to(network.dtype), t, context.to(network.dtype)).float()
    state = network.state_dict()  # a quantized layer's entries include its dtype and packed (weight, bias) pairs
    return {k: v.detach().clone() for k, v in state.items() if isinstance(v, torch.Tensor)}, out


def assert_identical(before: tuple, after: tuple) -> None:
    (state0, out0), (state1, out1) = before, after
    assert state0.keys() == state1.keys()
    for key in state0:
        assert state0[key].dtype == state1[key].dtype and torch.equal(state0[key], state1[key]), key
    assert torch.equal(out0, out1)


def freeu_on(unet: UNet3D) -> modifications.Modification:
    return freeu.apply(unet, freeu.FreeUConfig(b1=1.3, b2=1.5, s1=0.8, s2=0.5))


def cache_on(unet: UNet3D) -> modifications.Modification:
    cache = feature_cache.DeepCache(interval=2)
    cache.next_step()
    return feature_cache.attach(unet, cache)


def lora_on(unet: UNet3D) -> None:
    adapters = lora_adapters.add_lora(unet, lora_adapters.LoRAConfig(2), "test")
    with torch.no_grad():
        for adapter in adapters.values():
            adapter.up.weight.normal_(0, 0.1)  # a trained adapter: it changes the output


def winograd_on(unet: UNet3D) -> None:
    assert winograd.enable(unet, min_channels=1) > 0


# (kind, make the change, whether it is graph-safe, whether it changes the tiny UNet's output)
CASES: list[tuple[str, Callable[[UNet3D], object], bool, bool]] = [
    ("feature_cache", cache_on, False, False),
    ("freeu", freeu_on, False, True),
    ("lora", lora_on, False, True),
    ("chunked_feed_forward", lambda u: chunk_feed_forwards(u, 4), True, False),
    ("gradient_checkpointing", checkpoint_gradients, True, False),
    ("winograd", winograd_on, True, False),
    ("int8", quantize_int8, True, True),
]


@pytest.mark.parametrize("kind, change, safe, changes_output", CASES, ids=[c[0] for c in CASES])
def test_each_change_is_listed_declares_its_graph_safety_and_undoes_exactly(
    unet, monkeypatch, kind, change, safe, changes_output
):
    monkeypatch.setattr(winograd, "MIN_MACS", 0)  # the tiny UNet's calls are all small: switch every one
    before = snapshot(unet)
    assert modifications.active(unet) == [] and modifications.graph_safe(unet)
    change(unet)
    [made] = modifications.active(unet)
    assert made.kind == kind and made.graph_safe is safe and modifications.graph_safe(unet) is safe
    if kind != "feature_cache":  # a cache's first call runs whole and remembers; nothing to compare yet
        changed = snapshot(unet)[1]
        assert (not torch.allclose(changed, before[1], rtol=1e-4, atol=1e-4)) is changes_output
    modifications.undo(unet, made)
    assert modifications.active(unet) == [] and modifications.graph_safe(unet)
    assert_identical(before, snapshot(unet))
    assert all("_cinematic_modifications" not in m.__dict__ for m in unet.modules())


def test_undo_all_reverts_a_stack_of_changes_newest_first(unet, monkeypatch):
    monkeypatch.setattr(winograd, "MIN_MACS", 0)
    before = snapshot(unet)
    lora_on(unet)
    lora_adapters.merge(unet, "test")
    winograd_on(unet)
    chunk_feed_forwards(unet, 4)
    freeu_on(unet)
    kinds = [m.kind for m in modifications.active(unet)]
    assert kinds == ["lora", "lora_merge", "winograd", "chunked_feed_forward", "freeu"]
    modifications.undo_all(unet)
    assert_identical(before, snapshot(unet))


def test_compute_dtype_is_graph_safe_and_undoes_to_the_stored_parameters():
    torch.manual_seed(0)
    stored = randomize_(UNet3D(UNET_TINY)).eval().half()
    params = dict(stored.named_parameters())
    flags = {n: p.requires_grad for n, p in params.items()}
    before = {k: v.clone() for k, v in stored.state_dict().items()}
    compute_in(stored, torch.float32)
    [made] = modifications.active(stored)
    assert (made.kind, made.detail, made.graph_safe) == ("compute_dtype", "float32", True)
    assert stored.dtype == torch.float32  # reads as fp32
    modifications.undo(stored, made)
    after = stored.state_dict()
    assert before.keys() == after.keys()
    assert all(after[k].dtype == torch.float16 and torch.equal(after[k], v) for k, v in before.items())
    # The very Parameter objects come back (an optimizer holding them would not notice), unfrozen as they were.
    assert all(p is params[n] and p.requires_grad == flags[n] for n, p in stored.named_parameters())
    assert not any(hasattr(m, "parametrizations") for m in stored.modules())
    assert type(stored.conv_in) is nn.Conv2d


def test_int8_undo_puts_the_float_linear_layers_back(unet):
    linears = {n: m for n, m in unet.named_modules() if type(m) is nn.Linear}
    quantize_int8(unet)
    assert not any(type(m) is nn.Linear for m in unet.modules())
    modifications.undo_all(unet)
    assert {n: m for n, m in unet.named_modules() if type(m) is nn.Linear} == linears
    assert not any("qconfig" in m.__dict__ for m in unet.modules())


def test_a_lora_adapter_is_graph_safe_only_while_it_adds_nothing(unet):
    before = snapshot(unet)
    lora_on(unet)
    assert not modifications.graph_safe(unet)  # its hook adds up(down(x)), which a recording would not run
    lora_adapters.set_scale(unet, "test", 0.0)
    assert modifications.graph_safe(unet)  # at scale 0 the hook adds nothing
    lora_adapters.set_scale(unet, "test", 1.0)
    lora_adapters.merge(unet, "test")
    assert [m.kind for m in modifications.active(unet)] == ["lora", "lora_merge"]
    assert modifications.graph_safe(unet)  # merged: in the weights, which a recording reads
    merged = snapshot(unet)[1]
    lora_adapters.unmerge(unet, "test")
    assert [m.kind for m in modifications.active(unet)] == ["lora"]
    torch.testing.assert_close(snapshot(unet)[1], merged, rtol=1e-4, atol=1e-5)  # unmerged: the same function
    lora_adapters.merge(unet, "test")
    lora_adapters.remove(unet, "test")  # unmerges first
    assert modifications.active(unet) == []
    assert not any(hasattr(m, lora_adapters.ADAPTERS) for m in unet.modules())
    assert_identical(before, snapshot(unet))


def test_context_managers_undo_on_the_way_out(unet):
    before = snapshot(unet)
    with freeu.freeu(unet), feature_cache.caching(unet, feature_cache.DeepCache()):
        assert [m.kind for m in modifications.active(unet)] == ["freeu", "feature_cache"]
        assert not modifications.graph_safe(unet)
    with freeu.freeu(unet, None), feature_cache.caching(unet, None):
        assert modifications.active(unet) == []  # None: nothing changes
    assert_identical(before, snapshot(unet))


def test_undoing_a_change_not_in_force_is_an_error(unet):
    from cinematic.errors import CinematicError

    made = checkpoint_gradients(unet)
    modifications.undo(unet, made)
    with pytest.raises(CinematicError, match="not in force"):
        modifications.undo(unet, made)


def test_no_library_code_reads_torch_private_hook_dicts():
    private = re.compile(r"\._(forward|backward|state_dict|load_state_dict)\w*_hooks\b|\._forward_pre_hooks\b")
    offenders = [str(p.relative_to(SRC)) for p in SRC.rglob("*.py") if private.search(p.read_text())]
    assert offenders == []
