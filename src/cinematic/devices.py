"""Whether a device name is one torch knows and this machine has, checked before anything loads onto it; the CLI and
the server word the answer for their own flags."""

from __future__ import annotations

from dataclasses import dataclass

KINDS = ("cpu", "cuda", "mps")  # the devices cinematic runs on


@dataclass(frozen=True)
class DeviceProblem:
    """Why a device cannot be used: ``"unknown"`` (torch does not know the name), ``"unsupported"`` (a device
    cinematic does not run on, such as meta) or ``"unavailable"`` (this torch build or machine lacks it)."""

    reason: str
    text: str


def device_problem(device: str) -> DeviceProblem | None:
    """None when ``device`` can be used here."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        return DeviceProblem("unknown", "not a device name (cpu, cuda, cuda:N or mps)")
    if parsed.type not in KINDS:
        return DeviceProblem("unsupported", f"cinematic runs on {', '.join(KINDS)} or cuda:N, not {parsed.type}")
    if parsed.type == "cuda":
        if torch.version.cuda is None:
            return DeviceProblem("unavailable", f"this torch ({torch.__version__}) was built without CUDA")
        count = torch.cuda.device_count()
        if count == 0:
            return DeviceProblem("unavailable", "no CUDA device is available")
        if parsed.index is not None and parsed.index >= count:
            return DeviceProblem("unavailable", f"there is no CUDA device {parsed.index} (this machine has {count})")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        return DeviceProblem("unavailable", "MPS (Apple's GPU) is not available")
    return None
