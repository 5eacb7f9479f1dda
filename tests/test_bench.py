"""benchmarks/bench.py's own correctness: its three model folders hold one set of weights, and its arithmetic (step
cycles, whole-video estimates) is what benchmarks/README.md says."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import _bench_cases  # noqa: E402
import bench  # noqa: E402
from _bench_models import BENCH_TINY, make_folders  # noqa: E402

from cinematic.models.unet3d import UNet3D  # noqa: E402
from cinematic.weights import load  # noqa: E402


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("bench")
    folders = {layout: base / layout for layout in ("diffusers", "cinematic", "modelscope")}
    make_folders("tiny", folders)
    return folders


def test_a_run_without_modelscope_writes_and_needs_no_modelscope_folder(tmp_path):
    from _bench_models import folders_complete

    folders = {layout: tmp_path / layout for layout in ("diffusers", "cinematic", "modelscope")}
    make_folders("tiny", folders, {"diffusers", "cinematic"})
    assert folders_complete(folders, {"diffusers", "cinematic"})
    assert not folders["modelscope"].exists() and not folders_complete(folders)


def test_the_three_layouts_hold_the_same_weights(folders):
    ours = load(folders["cinematic"])
    for layout, variant in (("diffusers", "fp16"), ("modelscope", None)):
        other = load(folders[layout], variant=variant)
        assert other.config.unet == ours.config.unet == BENCH_TINY.unet
        for network in ("unet", "text_encoder", "vae"):
            theirs = getattr(other, network).state_dict()
            for key, value in getattr(ours, network).state_dict().items():
                assert torch.equal(theirs[key], value), (layout, network, key)


def test_modelscope_networks_compute_what_ours_compute(folders):
    torch.manual_seed(0)
    unet_sd, _ = _bench_cases._modelscope_networks(str(folders["modelscope"]), "tiny", "cpu", torch.float32)
    ours = UNet3D(BENCH_TINY.unet).eval()
    ours.load_state_dict(load(folders["cinematic"]).unet.state_dict())
    x, t, context = torch.randn(2, 4, 3, 8, 8), torch.tensor([900, 20]), torch.randn(2, 7, 1024)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, context), unet_sd(x, t, context), rtol=1e-5, atol=1e-5)


def test_step_clock_reports_the_median_cycle_and_warm_up_flops():
    clock = _bench_cases.StepClock("cpu", cycle=3)
    # warm-up cycle ends at 3.0; timed cycles of 3 steps: 1+1+1, 2+0.5+0.5, 9+0+0 -> means 1, 1, 3
    clock.stamps = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 8.5, 9.0, 18.0, 18.0, 18.0]
    result = clock.result(encode_flops=0)
    assert result["step_times"] == [1.0, 1.0, 1.0, 2.0, 0.5, 0.5, 9.0, 0.0, 0.0]
    assert result["step_s"] == 1.0


def test_step_clock_leaves_no_dispatch_mode_behind():
    # The sampler runs under inference_mode and the clock stops counting FLOPs from its callback, inside it.
    clock = _bench_cases.StepClock("cpu", cycle=1)
    clock.start()
    with torch.inference_mode():
        torch.ones(4, 4) @ torch.ones(4, 4)
        clock.step_done()
    clock.sampling_done()
    assert torch.empty(3).shape == (3,)  # a factory call with no tensor arguments, as the Winograd decode makes
    assert clock.counter.get_total_flops() == 2 * 4**3  # the one step it counted


def test_whole_video_estimates():
    def case(impl, mode, step_s, encode_s=1.0, decode_s=2.0):
        return {"impl": impl, "mode": mode, "step_s": step_s, "encode_s": encode_s, "decode_s": decode_s}

    results = [
        case("cinematic", bench.DEFAULT, 4.0),
        case("cinematic", bench.FP32, 9.0),  # the estimates take the default mode's step when both ran
        case("cinematic", "--cache-interval 3", 2.0),
        case("cinematic", "one conditional pass (a truncated step)", 2.5),
        case("diffusers", bench.PEERS["diffusers"], 5.0),
        case("modelscope", bench.PEERS["modelscope"], 6.0, encode_s=None),
        {"impl": "cinematic", "mode": "--int8", "error": "failed"},
    ]
    rows = {r["setting"]: r["seconds"] for r in bench.estimates(results)}
    assert rows["diffusers, DDIM 50"] == 1 + 50 * 5 + 2
    assert rows["modelscope, DDIM 50 (no text encoding)"] == 50 * 6 + 2
    assert rows["cinematic, DPM-Solver++ 25"] == 1 + 25 * 4 + 2
    assert rows["cinematic, DPM-Solver++ 25 --guidance-stop 0.8"] == 1 + 20 * 4 + 5 * 2.5 + 2
    # conditional-only steps under caching: 2.5 s scaled by the caching saving 2/4
    assert rows["cinematic, DPM-Solver++ 25 --cache-interval 3 --guidance-stop 0.8"] == 1 + 20 * 2 + 5 * 1.25 + 2
    table = bench.generation_table([{**r, "peak_rss": 2**30, "phase_peaks": {"steps": 1}, "flops_per_step": 1e9}
                                    if "step_s" in r else r for r in results], peak_gflops=10.0)  # fmt: skip
    assert "| --int8 " in table and "failed" in table and "1.00x" in table
