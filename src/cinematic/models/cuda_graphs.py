"""Replay a network's forward as CUDA graphs.

At 16 frames of 32x32 latents the UNet is thousands of small kernels: on a fast GPU the time goes to launching them
from Python, not to running them. A CUDA graph records one forward's kernels once and replays them with a single
launch. :class:`CUDAGraphs` keeps one recorded graph per input signature (shapes and dtypes: the guided and the
unguided batch, each window length) and copies each call's inputs into the graph's own input tensors.

What a graph cannot see, it must not be used for: a forward whose kernels depend on Python state (feature caching,
FreeU's hooks; :func:`cinematic.models.modifications.graph_safe` says which changes these are) runs eagerly, and
anything that changes the network's modules (adding or removing LoRA adapters) must :meth:`~CUDAGraphs.reset` it.
Weights changed in place, as a merged LoRA does, are seen by the replay.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

Signature = tuple[tuple[tuple[int, ...], torch.dtype], ...]


@dataclass
class _Recording:
    graph: torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor, ...]
    output: torch.Tensor


class CUDAGraphs:
    """``CUDAGraphs(fn)(*tensors)`` equals ``fn(*tensors)`` for CUDA tensors, recorded on the first call with each
    signature (after ``warmup`` eager calls on a side stream, as CUDA requires) and replayed after that.

    For inference only: ``fn`` takes and returns tensors, and no gradient flows through a replay. At most ``limit``
    recordings are kept (the least recently used goes); they share one memory pool, so each holds little beyond its
    inputs and output. The returned tensor is a copy: the next replay overwrites the graph's own output.
    """

    def __init__(self, fn: Callable[..., torch.Tensor], limit: int = 8, warmup: int = 2):
        self.fn, self.limit, self.warmup = fn, limit, warmup
        self.recordings: OrderedDict[Signature, _Recording] = OrderedDict()
        self.pool = None
        self.recorded = 0  # how many graphs were recorded, for tests and benchmarks

    def __call__(self, *tensors: torch.Tensor) -> torch.Tensor:
        signature = tuple((tuple(t.shape), t.dtype) for t in tensors)
        recording = self.recordings.get(signature)
        if recording is None:
            recording = self._record(tensors)
            self.recordings[signature] = recording
            while len(self.recordings) > self.limit:
                self.recordings.popitem(last=False)
        else:
            self.recordings.move_to_end(signature)
        with torch.inference_mode():  # the recording's tensors may be inference tensors; no autograd sees a replay
            for static, value in zip(recording.inputs, tensors):
                static.copy_(value)
            recording.graph.replay()
            return recording.output.clone()

    def _record(self, tensors: tuple[torch.Tensor, ...]) -> _Recording:
        if not all(t.is_cuda for t in tensors):
            raise ValueError("CUDA graphs need every input on a CUDA device")
        inputs = tuple(t.clone() for t in tensors)
        side = torch.cuda.Stream(device=inputs[0].device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # the first calls pick kernels and allocate workspaces, outside the graph
            for _ in range(self.warmup):
                self.fn(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            output = self.fn(*inputs)
        self.recorded += 1
        return _Recording(graph, inputs, output)

    def reset(self) -> None:
        """Forget every recording (after the network's modules changed)."""
        self.recordings.clear()
        self.pool = None
