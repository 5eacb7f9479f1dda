"""A library call leaves the process as it found it (style rule 18); the entry points change it, visibly.

Loading a model keeps torch's thread count, every ``torch.nn.init`` function and glibc's malloc settings; two
threads can load two models at once; ``cinematic generate``, ``cinematic eval`` and ``cinematic serve`` apply the
allocator setting (and the server its thread count) at start.
"""

from __future__ import annotations

import ctypes
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

import cinematic.allocator
from cinematic import Pipeline
from cinematic.errors import CinematicError
from tests.factories import make_diffusers_folder
from tests.glibc_probe import MALLINFO2

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def diffusers_folder(tmp_path_factory) -> Path:
    return make_diffusers_folder(tmp_path_factory.mktemp("process") / "tiny")


def init_functions() -> dict[str, object]:
    return {name: fn for name, fn in vars(torch.nn.init).items() if callable(fn) and not name.startswith("__")}


def load_both(folder: Path) -> list[Pipeline]:
    return [Pipeline.from_pretrained("shapes"), Pipeline.from_pretrained(folder)]


def test_loading_keeps_threads_and_init_functions(diffusers_folder):
    torch.set_num_threads(1)
    before = init_functions()
    load_both(diffusers_folder)
    assert torch.get_num_threads() == 1
    after = init_functions()
    assert after.keys() == before.keys()
    assert [name for name, fn in after.items() if fn is not before[name]] == []


# How much more glibc holds in mmap'd blocks while a fresh 64 MiB tensor lives, after loading both models. glibc's
# default serves it with its own mmap (its dynamic threshold stops at 32 MiB); mallopt(M_MMAP_MAX, 0), the setting
# of cinematic.allocator, would put it on the heap instead.
MMAP_PROBE = MALLINFO2 + textwrap.dedent(
    """
    import ctypes, sys
    import torch
    from cinematic import Pipeline

    pipes = [Pipeline.from_pretrained("shapes"), Pipeline.from_pretrained(sys.argv[1])]
    pipes[0]("a red circle moving left", steps=2, num_frames=2, seed=0, progress=False)  # and running it
    before = libc.mallinfo2()
    t = torch.ones(16 * 2**20)
    print(libc.mallinfo2().hblkhd - before.hblkhd)
    """
)


def test_loading_and_generating_keep_glibc_malloc_settings(diffusers_folder):
    try:
        ctypes.CDLL(None).mallinfo2  # noqa: B018
    except AttributeError:
        pytest.fail("this test needs glibc >= 2.33 (mallinfo2), as on the dev and CI machines")
    command = [sys.executable, "-c", MMAP_PROBE, str(diffusers_folder)]
    out = subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT)
    assert int(out.stdout.split()[-1]) >= 64 * 2**20  # still its own mmap: nobody called mallopt


def test_two_threads_load_two_models_at_once(diffusers_folder, monkeypatch):
    """Both loaders are held inside network construction (their last network, the VAE) while this thread builds
    and initialises layers of its own: those must come out as they do alone, and so must both models. Replacing
    torch.nn.init's functions for the duration of a build (the earlier approach) fails here every time."""
    import cinematic.models.vae as vae_module

    alone = [
        {net: getattr(p.model, net).state_dict() for net in ("unet", "text_encoder", "vae")}
        for p in load_both(diffusers_folder)
    ]

    def own_layers() -> list[torch.Tensor]:
        torch.manual_seed(1)
        linear, embedding = torch.nn.Linear(8, 8), torch.nn.Embedding(8, 4)
        return [linear.weight, linear.bias, embedding.weight]

    reference = own_layers()
    inside, release = threading.Barrier(3, timeout=120), threading.Barrier(3, timeout=120)

    class HeldVAE(vae_module.VAE):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            inside.wait()
            release.wait()

    monkeypatch.setattr(vae_module, "VAE", HeldVAE)
    results: dict[int, Pipeline] = {}
    errors: list[BaseException] = []

    def load(i: int, model: str | Path) -> None:
        try:
            results[i] = Pipeline.from_pretrained(model)
        except BaseException as error:  # reported below, after the barriers are broken
            errors.append(error)
            inside.abort()
            release.abort()

    loaders = [threading.Thread(target=load, args=(i, m)) for i, m in enumerate(["shapes", diffusers_folder])]
    for loader in loaders:
        loader.start()
    try:
        inside.wait()
        during = own_layers()
        init_during = init_functions()
    finally:
        try:
            release.wait()
        except threading.BrokenBarrierError:
            pass
        for loader in loaders:
            loader.join(120)
    assert errors == []
    for got, want in zip(during, reference, strict=True):
        assert got.device.type == "cpu"
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert init_during == init_functions()
    for i, want in enumerate(alone):
        for net, state in want.items():
            got = getattr(results[i].model, net).state_dict()
            assert got.keys() == state.keys()
            for key, tensor in state.items():
                assert torch.equal(got[key], tensor), f"model {i}, {net}.{key}"


# --- the entry points do apply it -------------------------------------------------------------------------------


@pytest.fixture
def allocator_calls(monkeypatch) -> list[str]:
    """Calls of cinematic.allocator.keep_freed_memory, recorded instead of made (this process keeps glibc's
    defaults); each entry point imports it when it runs, so the recorder is what it finds."""
    calls: list[str] = []
    monkeypatch.setattr(cinematic.allocator, "keep_freed_memory", lambda: calls.append("keep_freed_memory") or True)
    return calls


def stop_loading(*args, **kwargs):
    raise CinematicError("stopped by the test before loading")


@pytest.mark.parametrize(("device", "expected"), [("cpu", ["keep_freed_memory"]), ("meta", [])])
def test_generate_sets_the_allocator_at_start_on_cpu(allocator_calls, monkeypatch, device, expected):
    from cinematic.cli import main

    monkeypatch.setattr(Pipeline, "from_pretrained", stop_loading)
    assert main(["generate", "a red cat", "--model", "shapes", "--device", device, "--num-inference-steps", "2"]) == 2
    assert allocator_calls == expected


def test_eval_sets_the_allocator_at_start_on_cpu(allocator_calls, monkeypatch):
    from cinematic.cli import main

    monkeypatch.setattr(Pipeline, "from_pretrained", stop_loading)
    assert main(["eval", "--device", "cpu", "--seeds", "1", "--num-inference-steps", "2"]) == 2
    assert allocator_calls == ["keep_freed_memory"]


def test_serve_sets_threads_and_allocator_at_start(allocator_calls, monkeypatch, tmp_path):
    pytest.importorskip("uvicorn")
    import cinematic.serve.app as app_module
    from cinematic.cli import main

    seen: list[int] = []

    def create_app(settings):
        seen.append(torch.get_num_threads())  # already set when the model would load
        raise CinematicError("stopped by the test before loading")

    monkeypatch.setattr(app_module, "create_app", create_app)
    args = ["serve", "--model", "shapes", "--data", str(tmp_path / "data"), "--port", "0", "--device", "cpu"]
    assert main([*args, "--host", "127.0.0.1", "--threads", "1"]) == 2
    assert seen == [1]
    assert allocator_calls == ["keep_freed_memory"]


def test_opening_a_service_changes_neither(allocator_calls, tmp_path):
    from cinematic.serve.service import Service
    from tests.serve_helpers import quick_settings

    service = Service(quick_settings(tmp_path / "data"))  # threads=1 in its settings
    try:
        assert torch.get_num_threads() == 2  # conftest's, not the settings'
        assert allocator_calls == []
    finally:
        service.close()
