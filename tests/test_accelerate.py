"""Faster steps that keep the result: ``torch.compile`` and CUDA graphs (:meth:`Pipeline.accelerate`).

The CPU tests check the plumbing (which steps take the fast path, the checks of the settings); the CUDA tests need a
GPU and run where one is lent (``benchmarks/gpu.py`` times the same paths at full size there).
"""

from __future__ import annotations

import pytest
import torch

from cinematic.cli import main
from cinematic.errors import CinematicError
from cinematic.models.cuda_graphs import CUDAGraphs
from cinematic.pipeline import Pipeline
from tests.devices import REQUIRE_CUDA, cuda, need_cuda
from tests.factories import make_diffusers_folder

PROMPT = "a red cat riding a horse on the beach"
SMALL = dict(num_frames=3, height=32, width=32, steps=3, seed=5, progress=False)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_diffusers_folder(tmp_path_factory.mktemp("accelerate") / "model")


class CountingCompile:
    """Stands in for ``torch.compile``: returns the module itself, counting the calls that reach it."""

    def __init__(self):
        self.calls, self.modes = 0, []

    def __call__(self, module, mode=None, dynamic=None):
        self.modes.append(mode)

        def compiled(*args, **kwargs):
            assert not kwargs, "the fast path passes tensors only"
            self.calls += 1
            return module(*args)

        return compiled


def test_plain_steps_go_through_the_compiled_unet_and_equal_eager(folder, monkeypatch):
    pipe = Pipeline.from_pretrained(folder)
    eager = pipe(PROMPT, **SMALL).frames
    fake = CountingCompile()
    monkeypatch.setattr(torch, "compile", fake)
    pipe.accelerate(compile="max-autotune")
    assert fake.modes == ["max-autotune"]
    torch.testing.assert_close(pipe(PROMPT, **SMALL).frames, eager, rtol=0, atol=0)
    assert fake.calls == 3  # one batched (guided) evaluation per step


def test_cached_and_freeu_steps_run_eagerly(folder, monkeypatch):
    pipe = Pipeline.from_pretrained(folder)
    fake = CountingCompile()
    monkeypatch.setattr(torch, "compile", fake)
    pipe.accelerate(compile="default")
    assert fake.modes == [None]  # torch.compile's own default
    pipe(PROMPT, **SMALL, freeu=True)
    assert fake.calls == 0  # FreeU's hooks would not run inside a compiled or recorded forward
    pipe(PROMPT, **(SMALL | {"steps": 4}), cache_interval=2)
    assert fake.calls == 0  # feature caching changes the forward from step to step
    pipe.accelerate()  # off again
    pipe(PROMPT, **SMALL)
    assert fake.calls == 0


def test_steps_with_lora_adapters_attached_run_eagerly(folder, monkeypatch):
    from cinematic.models import lora_adapters as lora_modules
    from cinematic.models.lora_adapters import LoRAConfig

    pipe = Pipeline.from_pretrained(folder)
    fake = CountingCompile()
    monkeypatch.setattr(torch, "compile", fake)
    pipe.accelerate(compile="default")
    lora_modules.add_lora(pipe.model.unet, LoRAConfig(2, 2.0, "both"), "test")  # its hooks add the adapters' output
    pipe(PROMPT, **SMALL)
    assert fake.calls == 0
    lora_modules.merge(pipe.model.unet, "test")  # merged: in the weights, which the fast path reads
    pipe(PROMPT, **SMALL)
    assert fake.calls == 3
    lora_modules.remove(pipe.model.unet, "test")
    pipe(PROMPT, **SMALL)
    assert fake.calls == 6


def test_accelerate_settings_are_checked(folder):
    pipe = Pipeline.from_pretrained(folder)
    with pytest.raises(CinematicError, match="unknown compile mode 'fastest'; allowed: default, reduce-overhead"):
        pipe.accelerate(compile="fastest")
    with pytest.raises(CinematicError, match="CUDA graphs need a CUDA device, not cpu; allowed: --device cuda"):
        pipe.accelerate(cuda_graphs=True)
    with pytest.raises(ValueError, match="CUDA graphs need every input on a CUDA device"):
        CUDAGraphs(torch.nn.Identity())(torch.zeros(2))


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--compile", "fastest"], "unknown compile mode 'fastest'; allowed: default, reduce-overhead"),
        (["--cuda-graphs", "--device", "cpu"], "CUDA graphs need a CUDA device, not cpu"),
    ],
)
def test_generate_rejects_bad_acceleration_settings(folder, tmp_path, capsys, extra, message):
    args = ["generate", "a cat", "-o", str(tmp_path / "c.mp4"), "--model", str(folder), "--num-inference-steps", "1"]
    assert main([*args, "--num-frames", "2", "--height", "32", "--width", "32", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert list(tmp_path.iterdir()) == []


def test_a_missing_gpu_skips_or_fails_under_require_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv(REQUIRE_CUDA, raising=False)
    with pytest.raises(pytest.skip.Exception, match="needs a CUDA device"):
        need_cuda()
    monkeypatch.setenv(REQUIRE_CUDA, "0")
    with pytest.raises(pytest.skip.Exception):
        need_cuda()
    monkeypatch.setenv(REQUIRE_CUDA, "1")
    with pytest.raises(pytest.fail.Exception, match="CINEMATIC_REQUIRE_CUDA=1 makes that an error"):
        need_cuda()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    need_cuda()  # a GPU: nothing to skip or fail


def test_require_cuda_fails_the_cuda_tests_without_a_gpu():
    """The switch as a run on a GPU machine uses it: every CUDA test in this file, run under
    CINEMATIC_REQUIRE_CUDA=1, fails without a GPU (and passes with one), where it would otherwise skip."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, REQUIRE_CUDA: "1", "PYTHONPATH": os.pathsep.join([str(root / "src"), str(root)])}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", __file__],
        cwd=root, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    if torch.cuda.is_available():
        assert run.returncode == 0 and "3 passed" in run.stdout, run.stdout[-2000:]
    else:
        assert run.returncode == 1 and "3 errors" in run.stdout, run.stdout[-2000:]  # failed in their set-up
        assert run.stdout.count("CINEMATIC_REQUIRE_CUDA=1 makes that an error") >= 3


# --- on a GPU -------------------------------------------------------------------------------------------------------


@cuda
def test_cuda_graph_replays_equal_eager_and_record_once_per_signature():
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8)).cuda()
    graphs = CUDAGraphs(net, limit=2)
    with torch.inference_mode():
        for shape in [(4, 16), (4, 16), (3, 16), (4, 16), (5, 16), (3, 16)]:
            x = torch.randn(shape, device="cuda")
            torch.testing.assert_close(graphs(x), net(x))
    # (4,16) and (3,16) recorded; (5,16) pushed out (3,16), the least recently used, which was recorded again
    assert graphs.recorded == 4 and len(graphs.recordings) == 2
    first = graphs(torch.ones(3, 16, device="cuda"))
    graphs(torch.zeros(3, 16, device="cuda"))
    torch.testing.assert_close(first, net(torch.ones(3, 16, device="cuda")))  # a copy, not the graph's own output


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pipeline_with_cuda_graphs_equals_eager(folder, dtype):
    pipe = Pipeline.from_pretrained(folder, device="cuda", dtype=dtype)
    eager = pipe(PROMPT, **SMALL).frames
    truncated = pipe(PROMPT, **SMALL, guidance_stop=0.5).frames
    pipe.accelerate(cuda_graphs=True)
    assert (pipe(PROMPT, **SMALL).frames.int() - eager.int()).abs().max() <= 1
    assert (pipe(PROMPT, **SMALL, guidance_stop=0.5).frames.int() - truncated.int()).abs().max() <= 1
    assert pipe._graphs.recorded == 2  # the guided batch of 2, then the conditional batch of 1
    pipe(PROMPT, **(SMALL | {"steps": 4}), cache_interval=2)
    assert pipe._graphs.recorded == 2  # cached steps ran eagerly
