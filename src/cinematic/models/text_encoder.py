"""The OpenCLIP ViT-H/14 text tower, cut after its penultimate layer (reference-model.md section 2).

ModelScope conditions on the output of resblock 22 of 24 followed by ``ln_final``; diffusers gets the same tensor
from a 23-layer ``CLIPTextModel``'s ``last_hidden_state``. This module is that 23-layer model: ``layers`` counts the
layers that are used, and the 24th is never built. Attribute names are transformers' ``CLIPTextModel`` names, so
the diffusers ``text_encoder/`` weights load without renames; ``weights/openclip.py`` converts the original file.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cinematic.errors import CinematicError
from cinematic.models import sizes
from cinematic.models.checks import MAX_CHANNELS, MAX_CONTEXT, MAX_TEXT_LAYERS, MAX_VOCAB, integer, number
from cinematic.models.layers import LayerNorm, multi_head_attention


@dataclass(frozen=True)
class TextEncoderConfig:
    vocab_size: int = 49408
    context_length: int = 77
    width: int = 1024
    # Layers used: the published tower has 24, the last of which is skipped. 0 is allowed: every position is then its
    # own token's embedding plus its position's, through the final LayerNorm, with nothing mixing the words (the
    # shapes model: a causal tower makes each word's features depend on every word before it).
    layers: int = 23
    heads: int = 16
    mlp_width: int = 4096
    eps: float = 1e-5

    def __post_init__(self) -> None:
        integer(self.vocab_size, "text_encoder.vocab_size", 1, MAX_VOCAB)
        integer(self.context_length, "text_encoder.context_length", 1, MAX_CONTEXT)
        for name in ("width", "heads", "mlp_width"):
            integer(getattr(self, name), f"text_encoder.{name}", 1, MAX_CHANNELS)
        integer(self.layers, "text_encoder.layers", 0, MAX_TEXT_LAYERS)
        if self.width % self.heads:
            raise CinematicError(f"text_encoder.width {self.width} is not divisible by heads {self.heads}")
        number(self.eps, "text_encoder.eps", 0, 1, open_low=True)
        sizes.check_parameters("the text encoder", self.parameter_count())

    def parameter_count(self) -> int:
        """The parameters :class:`TextEncoder` builds for this config, counted without building."""
        width = self.width
        layer = 2 * sizes.norm(width) + 4 * sizes.linear(width, width) + sizes.linear(width, self.mlp_width)
        layer += sizes.linear(self.mlp_width, width)
        embeddings = (self.vocab_size + self.context_length) * width
        return embeddings + self.layers * layer + sizes.norm(width)


TEXT_FULL = TextEncoderConfig()
# For tests and toy runs; vocab_size covers tests/clip_vocab.py's tiny vocabulary (716 tokens).
TEXT_TINY = TextEncoderConfig(vocab_size=1000, width=32, layers=2, heads=4, mlp_width=64)


class TextEmbeddings(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.context_length, cfg.width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # Positions are read straight from the weight: no position_ids buffer, which transformers keeps
        # out of its state dict anyway.
        embedded = self.token_embedding(tokens)
        positions = self.position_embedding.weight[: tokens.shape[1]]  # [L, width]
        return embedded + positions.to(embedded.dtype)


class SelfAttention(nn.Module):
    """Causal multi-head self-attention with separate q/k/v projections (OpenCLIP stores them fused)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = multi_head_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads, causal=True)
        return self.out_proj(out)


class MLP(nn.Module):
    def __init__(self, width: int, mlp_width: int):
        super().__init__()
        self.fc1 = nn.Linear(width, mlp_width)
        self.fc2 = nn.Linear(mlp_width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact GELU: ViT-H/14 is not one of the QuickGELU models


class EncoderLayer(nn.Module):
    """Pre-LN residual block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.layer_norm1 = LayerNorm(cfg.width, eps=cfg.eps)
        self.self_attn = SelfAttention(cfg.width, cfg.heads)
        self.layer_norm2 = LayerNorm(cfg.width, eps=cfg.eps)
        self.mlp = MLP(cfg.width, cfg.mlp_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class TextEncoder(nn.Module):
    """Token ids ``[B, L]`` (L <= context_length) to the UNet's context ``[B, L, width]``."""

    def __init__(self, cfg: TextEncoderConfig = TEXT_FULL):
        super().__init__()
        self.cfg = cfg
        self.embeddings = TextEmbeddings(cfg)
        self.encoder = Encoder(cfg)
        self.final_layer_norm = LayerNorm(cfg.width, eps=cfg.eps)
        self._init_weights()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.ndim != 2 or tokens.shape[1] > self.cfg.context_length:
            raise ValueError(f"expected token ids [B, L<={self.cfg.context_length}], got {tuple(tokens.shape)}")
        x = self.embeddings(tokens)  # [B, L, width]
        return self.final_layer_norm(self.encoder(x))

    def _init_weights(self) -> None:
        # OpenCLIP's TextTransformer.init_parameters, for training from scratch: small embeddings, and residual
        # output projections shrunk by sqrt(2 * layers) so the residual stream does not grow with depth.
        # Loading a checkpoint overwrites all of it, and cinematic.weights.build_networks skips it altogether.
        cfg = self.cfg
        attn_std = cfg.width**-0.5
        proj_std = attn_std * (2 * max(cfg.layers, 1)) ** -0.5
        nn.init.normal_(self.embeddings.token_embedding.weight, std=0.02)
        nn.init.normal_(self.embeddings.position_embedding.weight, std=0.01)
        for layer in self.encoder.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                nn.init.normal_(proj.weight, std=attn_std)
            nn.init.normal_(layer.self_attn.out_proj.weight, std=proj_std)
            nn.init.normal_(layer.mlp.fc1.weight, std=(2 * cfg.width) ** -0.5)
            nn.init.normal_(layer.mlp.fc2.weight, std=proj_std)
            for linear in (m for m in layer.modules() if isinstance(m, nn.Linear)):
                nn.init.zeros_(linear.bias)
