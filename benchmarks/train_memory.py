"""Computed (not measured) training memory of text-to-video-ms-1.7b under each memory switch (issue 26).

Per device, before activations: the weights, gradients, optimizer state and EMA copy that ``cinematic train`` holds,
from the parameter counts of the full-size networks (built on the ``meta`` device, so nothing is allocated):

- every network is float32 while training (``train/setup.py`` loads the model so); a trained parameter costs 4
  bytes of weight, 4 of gradient, 8 of AdamW state (2 with ``--optimizer adamw8bit``: two 8-bit moments, plus one
  float32 scale per 2048-value block of each, which is left out: under 0.01 bytes) and 4 of EMA copy (0 with
  ``--ema-decay 0``);
- ``--cache-latents`` (with the text encoder frozen and no sample videos): the VAE and text encoder leave the
  device for the CPU;
- ``--fsdp`` over N devices: each device holds 1/N of the trained networks' weights, gradients, optimizer state and
  EMA (frozen networks are not sharded), plus one block's gathered weights at a time, left out here;
- distillation (``cinematic distill``, ``train/distill.py``): a frozen teacher UNet beside a trained full student and
  its EMA target network (a third float32 copy, apart from the EMA copy that is saved; ``--fsdp`` is refused), or LoRA
  on every linear and convolution layer of one UNet that serves as teacher with the adapters off, with a second,
  frozen adapter of the same size as its EMA target.

``--gradient-checkpointing`` and bf16 autocast change activations only, which depend on the clip size and are not
computed here.

    .venv/bin/python benchmarks/train_memory.py --json build/train-memory.json
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import markdown_table  # noqa: E402

GB = 1e9  # decimal gigabytes, as GPU memory is sold


@dataclass(frozen=True)
class Case:
    name: str
    trained: int  # parameters that train
    frozen: dict[str, int]  # frozen networks on the device: name -> parameters
    cacheable: tuple[str, ...]  # frozen networks that --cache-latents takes off the device
    shardable: bool  # whether --fsdp applies


def counts() -> dict[str, int]:
    """Parameters of the full-size networks, and of LoRA adapters (cinematic's: attention projections, both
    targets, rank 16; distillation's: every linear and convolution layer of the UNet, rank 32)."""
    import torch
    from torch import nn

    from cinematic.models.lora_adapters import target_layers
    from cinematic.models.presets import PRESETS
    from cinematic.models.text_encoder import TextEncoder
    from cinematic.models.unet3d import UNet3D
    from cinematic.models.vae import VAE

    config = PRESETS["full"]
    with torch.device("meta"):
        unet, text, vae = UNet3D(config.unet), TextEncoder(config.text_encoder), VAE(config.vae)
    lora = sum(16 * (layer.in_features + layer.out_features) for layer in target_layers(unet, "both").values())
    every = 0
    for module in unet.modules():
        if isinstance(module, nn.Linear):
            every += 32 * (module.in_features + module.out_features)
        elif isinstance(module, nn.Conv2d | nn.Conv3d):
            rank = min(32, module.in_channels, module.out_channels)
            every += rank * (module.in_channels * module.weight[0, 0].numel() + module.out_channels)
    total = {
        name: sum(p.numel() for p in net.parameters()) for name, net in [("unet", unet), ("text", text), ("vae", vae)]
    }
    return {**total, "lora16": lora, "lora32_every": every}


def cases(n: dict[str, int]) -> list[Case]:
    base = {k: n[k] for k in ("unet", "text", "vae")}
    frozen_text = ("text", "vae")
    return [
        Case("full fine-tune, UNet (--train unet)", n["unet"], {"text": n["text"], "vae": n["vae"]}, frozen_text, True),
        Case("full fine-tune, UNet + text (the default)", n["unet"] + n["text"], {"vae": n["vae"]}, ("vae",), True),
        Case("LoRA rank 16, attention (--lora 16)", n["lora16"], base, frozen_text, False),
        Case(  # the teacher and the EMA target are whole frozen copies; distill refuses --fsdp
            "distillation, full student + teacher + target",
            n["unet"],
            {**base, "unet": 0, "teacher": n["unet"], "target": n["unet"]},
            frozen_text,
            False,
        ),
        Case(  # the EMA target is a second adapter of the same size on the same UNet
            "distillation, LoRA rank 32 on every layer",
            n["lora32_every"],
            {**base, "target": n["lora32_every"]},
            frozen_text,
            False,
        ),
    ]


def gigabytes(case: Case, adam_bytes: int, ema: bool, cached: bool, shards: int) -> float:
    per_trained = 4 + 4 + adam_bytes + (4 if ema else 0)
    frozen = sum(p for name, p in case.frozen.items() if not (cached and name in case.cacheable))
    return (case.trained * per_trained / shards + 4 * frozen) / GB


SWITCHES = {  # column: (optimizer state bytes per parameter, EMA, cached latents, FSDP shards)
    "AdamW + EMA (defaults)": (8, True, False, 1),
    "8-bit AdamW": (2, True, False, 1),
    "8-bit AdamW, --ema-decay 0": (2, False, False, 1),
    "8-bit AdamW, no EMA, cached latents": (2, False, True, 1),
    "--fsdp on 8 GPUs (AdamW + EMA)": (8, True, False, 8),
    "--fsdp on 8, 8-bit, no EMA, cached": (2, False, True, 8),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    n = counts()
    rows, data = [], []
    for case in cases(n):
        values = {}
        for column, (adam, ema, cached, shards) in SWITCHES.items():
            values[column] = (
                None if shards > 1 and not case.shardable else round(gigabytes(case, adam, ema, cached, shards), 1)
            )
        rows.append([case.name, f"{case.trained / 1e6:,.1f} M", *("-" if v is None else v for v in values.values())])
        data.append({"case": case.name, "trained_parameters": case.trained, "gigabytes": values})
    print("parameters: " + ", ".join(f"{k} {v:,}" for k, v in n.items()))
    print(markdown_table(["GB per device, before activations", "trained", *SWITCHES], rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"parameters": n, "rows": data}, indent=2))


if __name__ == "__main__":
    main()
