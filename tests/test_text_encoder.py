"""Text encoder parity with transformers' CLIPTextModel (pinned in pyproject) and with an OpenCLIP-layout
reference forward built on torch.nn.MultiheadAttention, plus full-size key and shape checks on the meta device."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from cinematic.errors import CinematicError
from cinematic.models.text_encoder import TEXT_FULL, TEXT_TINY, TextEncoder, TextEncoderConfig
from cinematic.weights.openclip import convert_openclip_text
from tests.clip_vocab import tiny_clip_vocab

CFG = dataclasses.replace(TEXT_TINY, vocab_size=100)


def _hf_model(cfg: TextEncoderConfig) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.width,
        intermediate_size=cfg.mlp_width,
        num_hidden_layers=cfg.layers,  # diffusers' config keeps only the 23 used layers, as we do
        num_attention_heads=cfg.heads,
        max_position_embeddings=cfg.context_length,
        hidden_act="gelu",
        layer_norm_eps=cfg.eps,
        bos_token_id=0,
        eos_token_id=1,  # in range, so transformers does not warn about the stale defaults
        pad_token_id=0,
    )
    config._attn_implementation = "eager"  # explicit mask + softmax: a second path next to our SDPA
    return CLIPTextModel(config).eval()


def _perturb(module: nn.Module) -> None:
    # LayerNorms start at exactly 1 and 0 and biases at 0; random values make every parameter count.
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.1)


def strip_text_model_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 4 files prefix every CLIPTextModel key with ``text_model.``; version 5 does not."""
    return {k.removeprefix("text_model."): v for k, v in state_dict.items()}


def _tokens(batch: int, length: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length))


@pytest.mark.parametrize("layout", ["transformers5", "transformers4"])
def test_matches_transformers_clip_text_model(layout):
    hf = _hf_model(CFG)
    _perturb(hf)
    state = hf.state_dict()
    assert "embeddings.position_ids" not in state  # a non-persistent buffer: nothing for us to load
    if layout == "transformers4":
        state = strip_text_model_prefix({f"text_model.{k}": v for k, v in state.items()})
    ours = TextEncoder(CFG).eval()
    ours.load_state_dict(state, strict=True)
    for length in (77, 9):
        tokens = _tokens(2, length, CFG.vocab_size)
        with torch.no_grad():
            expected = hf(input_ids=tokens).last_hidden_state
            torch.testing.assert_close(ours(tokens), expected, rtol=1e-5, atol=1e-5)


def _openclip_state(cfg: TextEncoderConfig, blocks: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    """A random OpenCLIP CLIP state dict: text tower with ``blocks`` resblocks plus the keys it must drop."""
    w, m = cfg.width, cfg.mlp_width
    shapes = {
        "token_embedding.weight": (cfg.vocab_size, w),
        "positional_embedding": (cfg.context_length, w),
        "ln_final.weight": (w,),
        "ln_final.bias": (w,),
        "text_projection": (w, w),
        "logit_scale": (),
        "attn_mask": (cfg.context_length, cfg.context_length),
        "visual.conv1.weight": (8, 3, 14, 14),
        "visual.transformer.resblocks.0.attn.in_proj_weight": (24, 8),
    }
    for i in range(blocks):
        block = {
            "ln_1.weight": (w,),
            "ln_1.bias": (w,),
            "attn.in_proj_weight": (3 * w, w),
            "attn.in_proj_bias": (3 * w,),
            "attn.out_proj.weight": (w, w),
            "attn.out_proj.bias": (w,),
            "ln_2.weight": (w,),
            "ln_2.bias": (w,),
            "mlp.c_fc.weight": (m, w),
            "mlp.c_fc.bias": (m,),
            "mlp.c_proj.weight": (w, m),
            "mlp.c_proj.bias": (w,),
        }
        shapes |= {f"transformer.resblocks.{i}.{k}": s for k, s in block.items()}
    state = {k: torch.randn(s, device=device) * 0.2 for k, s in shapes.items()}
    if device != "meta":
        for key in [k for k in state if k.endswith(("ln_1.weight", "ln_2.weight", "ln_final.weight"))]:
            state[key] += 1.0
    return state


def _openclip_reference(state: dict[str, torch.Tensor], tokens: torch.Tensor, heads: int) -> torch.Tensor:
    """OpenCLIP's text forward with ModelScope's penultimate cut: all resblocks but the last, then ln_final."""
    width = state["token_embedding.weight"].shape[1]
    blocks = sorted({int(k.split(".")[2]) for k in state if k.startswith("transformer.resblocks.")})
    length = tokens.shape[1]
    x = F.embedding(tokens, state["token_embedding.weight"]) + state["positional_embedding"][:length]
    mask = torch.full((length, length), float("-inf")).triu(1)
    for i in blocks[:-1]:
        p = {k.removeprefix(f"transformer.resblocks.{i}."): v for k, v in state.items() if f"resblocks.{i}." in k}
        attn = nn.MultiheadAttention(width, heads, batch_first=True).eval()
        attn.load_state_dict({k.removeprefix("attn."): v for k, v in p.items() if k.startswith("attn.")})
        h = F.layer_norm(x, (width,), p["ln_1.weight"], p["ln_1.bias"], 1e-5)
        x = x + attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        h = F.layer_norm(x, (width,), p["ln_2.weight"], p["ln_2.bias"], 1e-5)
        x = x + F.linear(F.gelu(F.linear(h, p["mlp.c_fc.weight"], p["mlp.c_fc.bias"])), *_linear(p, "mlp.c_proj"))
    return F.layer_norm(x, (width,), state["ln_final.weight"], state["ln_final.bias"], 1e-5)


def _linear(p: dict[str, torch.Tensor], name: str) -> tuple[torch.Tensor, torch.Tensor]:
    return p[f"{name}.weight"], p[f"{name}.bias"]


def test_matches_openclip_layout_reference():
    state = _openclip_state(CFG, blocks=CFG.layers + 1)
    ours = TextEncoder(CFG).eval()
    ours.load_state_dict(convert_openclip_text(state, CFG.layers), strict=True)
    tokens = _tokens(2, 77, CFG.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), _openclip_reference(state, tokens, CFG.heads), rtol=1e-5, atol=1e-5)


def test_full_size_matches_transformers_keys_and_openclip_conversion():
    with torch.device("meta"):
        ours = TextEncoder(TEXT_FULL)
        hf = _hf_model(TEXT_FULL)
        openclip = _openclip_state(TEXT_FULL, blocks=24, device="meta")
    assert sum(p.numel() for p in ours.parameters()) == 340_387_840
    shapes = {k: v.shape for k, v in ours.state_dict().items()}
    assert shapes == {k: v.shape for k, v in hf.state_dict().items()}
    converted = convert_openclip_text(openclip, layers=TEXT_FULL.layers)
    assert {k: v.shape for k, v in converted.items()} == shapes
    ours.load_state_dict(converted, strict=True, assign=True)


def test_converter_rejects_unknown_and_missing_keys():
    state = _openclip_state(CFG, blocks=CFG.layers + 1)
    with pytest.raises(CinematicError, match="cond_stage_model.extra"):
        convert_openclip_text({**state, "cond_stage_model.extra": torch.zeros(1)}, CFG.layers)
    with pytest.raises(CinematicError, match=r"transformer\.resblocks\.0\.ls_1\.gamma"):
        convert_openclip_text({**state, "transformer.resblocks.0.ls_1.gamma": torch.zeros(1)}, CFG.layers)
    del state["transformer.resblocks.1.mlp.c_fc.bias"]
    with pytest.raises(CinematicError, match=r"encoder\.layers\.1\.mlp\.fc1\.bias"):
        convert_openclip_text(state, CFG.layers)


def test_tiny_config_covers_tiny_vocab():
    assert len(tiny_clip_vocab()) <= TEXT_TINY.vocab_size


def test_config_validation():
    with pytest.raises(CinematicError, match="divisible"):
        TextEncoderConfig(width=30, heads=4)
    with pytest.raises(CinematicError, match="layers must be 0 or more"):
        TextEncoderConfig(layers=-1)


def test_zero_layers_keep_every_word_to_its_own_position():
    """layers=0 (the shapes model): each position's features are its token and position alone, through the final
    LayerNorm, so changing one word changes that position only."""
    model = TextEncoder(dataclasses.replace(TEXT_TINY, layers=0, context_length=8)).eval()
    assert len(model.encoder.layers) == 0
    tokens = torch.tensor([[1, 5, 6, 7, 8, 9, 2, 0]])
    changed = tokens.clone()
    changed[0, 5] = 11
    with torch.no_grad():
        out, other = model(tokens), model(changed)
        emb = model.embeddings
        expected = F.layer_norm(emb.token_embedding(tokens) + emb.position_embedding.weight[:8], (TEXT_TINY.width,),
                                model.final_layer_norm.weight, model.final_layer_norm.bias, TEXT_TINY.eps)  # fmt: skip
    torch.testing.assert_close(out, expected)
    moved = (out - other).abs().amax(dim=-1)[0]
    assert moved[5] > 0.1 and torch.equal(moved[:5], torch.zeros(5)) and torch.equal(moved[6:], torch.zeros(2))


def test_causal_and_batch_invariance():
    model = TextEncoder(CFG).eval()
    tokens = _tokens(2, 77, CFG.vocab_size)
    with torch.no_grad():
        out = model(tokens)
        torch.testing.assert_close(torch.cat([model(tokens[:1]), model(tokens[1:])]), out)
        # later tokens (the padding, in practice) cannot change earlier positions
        changed = tokens.clone()
        changed[:, 40:] = 0
        torch.testing.assert_close(model(changed)[:, :40], out[:, :40])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights(dtype):
    model = TextEncoder(CFG).eval()
    _perturb(model)
    tokens = _tokens(2, 77, CFG.vocab_size)
    with torch.no_grad():
        expected = model(tokens)
        out = model.to(dtype)(tokens)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, rtol=0.05, atol=0.05)
