"""What ``bench.py``'s child processes run: one case each, in a fresh process, reported with ``_common.emit``.

A *generation* case is a whole generation as a user runs it: import and load, encode the prompt and the empty
negative prompt, ``warmup + timed`` denoising steps with classifier-free guidance (scale 9), decode every frame.
Per-step times are the gaps between step-end timestamps (the device synchronised first); the warm-up steps are
also the ones counted by ``FlopCounterMode`` (which slows them, so they are not timed), minus the FLOPs of the
text encoding that runs inside the same sampling call. Peak RSS is the child's ``ru_maxrss`` at its end.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _bench_models import ldm_ddconfig, model_config, unetsd_from_cfg
from _common import current_rss, emit, peak_rss, tensor_bytes, touch

PROMPT = "an astronaut riding a horse on the moon"
GUIDANCE = 9.0
SEED = 0


def _torch(spec: dict[str, Any]):
    import torch

    torch.set_num_threads(spec["threads"])
    return torch


def _as_the_cli(device) -> None:
    """What ``cinematic generate`` does at start on the CPU, which loading no longer does: glibc keeps freed memory
    (cinematic.allocator). Only in cinematic's cases: the peers keep glibc's defaults."""
    import torch

    from cinematic.allocator import keep_freed_memory

    if torch.device(device).type == "cpu":
        keep_freed_memory()


def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _timed(fn: Callable[[], Any], device) -> tuple[Any, float]:
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - start


def _flops(fn: Callable[[], Any]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


class StepClock:
    """Step-end timestamps; FLOPs counted over the first ``cycle`` (warm-up) steps only.

    ``cycle`` is 1, or the cache interval for feature caching, whose steps differ in cost: then a step's cost is
    the mean over whole cycles, and the reported figure is the median over the timed cycles.
    """

    def __init__(self, device, cycle: int):
        from torch.utils.flop_counter import FlopCounterMode

        self.device, self.cycle, self.stamps = device, cycle, []
        self.counter = FlopCounterMode(display=False)
        self.counting = False

    def start(self) -> None:
        self.counter.__enter__()
        self.counting = True

    def step_done(self) -> None:
        _sync(self.device)
        self.stamps.append(time.perf_counter())
        if self.counting and len(self.stamps) == self.cycle:
            self.counter.__exit__(None, None, None)
            self.counting = False

    def sampling_done(self) -> None:
        """Call after the sampling call returns. ``step_done`` leaves the counter inside the sampler's
        ``inference_mode``, whose exit restores the dispatch keys it was entered with, the counter's Python key among
        them; entering and leaving an empty mode clears it again. Without this, the next factory call with no tensor
        arguments (a ``torch.empty`` in the Winograd convolutions of the decode) fails in PyTorch's Python fallback."""
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False):
            pass

    def result(self, encode_flops: int) -> dict[str, Any]:
        times = [b - a for a, b in zip(self.stamps[self.cycle - 1 :], self.stamps[self.cycle :])]
        cycles = [statistics.mean(times[i : i + self.cycle]) for i in range(0, len(times) - self.cycle + 1, self.cycle)]
        flops = (self.counter.get_total_flops() - encode_flops) / self.cycle
        return {"step_times": times, "step_s": statistics.median(cycles), "flops_per_step": flops}


class RssMonitor:
    """The highest RSS seen in each phase of a generation (load, encode, steps, decode), polled every 10 ms by a
    background thread: where the peak happens. ``ru_maxrss`` stays the authoritative whole-run peak."""

    def __init__(self) -> None:
        import threading

        self.phase, self.peaks = "start", {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(0.01):
            self._sample()

    def _sample(self) -> None:
        self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), current_rss())

    def enter(self, phase: str) -> None:
        self._sample()
        self.phase = phase
        self._sample()

    def stop(self) -> dict[str, int]:
        self._sample()
        self._stop.set()
        self._thread.join()
        return self.peaks


def _memory(device, monitor: RssMonitor) -> dict[str, Any]:
    import torch

    out = {"peak_rss": peak_rss(), "rss_end": current_rss(), "phase_peaks": monitor.stop()}
    if torch.device(device).type == "cuda":
        out["cuda_peak_allocated"] = torch.cuda.max_memory_allocated()
    return out


def _noise(spec: dict[str, Any]):
    import torch

    f = 8  # the VAE's downsampling factor, the same in every model here
    shape = (1, 4, spec["frames"], spec["size"] // f, spec["size"] // f)
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(SEED))


# ---------------------------------------------------------------------------------------------------------------------
# cinematic


def cinematic_generation(spec: dict[str, Any]) -> None:
    start = time.perf_counter()
    torch = _torch(spec)
    from cinematic.generation.memory import Memory
    from cinematic.pipeline import Pipeline

    device, mode = spec["device"], spec["mode"]
    _as_the_cli(device)
    rss_base = current_rss()
    import_s = time.perf_counter() - start
    monitor = RssMonitor()
    monitor.enter("load")
    defaults = mode.get("defaults", False)  # the library's own choices: dtypes by size, the memory plan, as the CLI
    if defaults:
        pipe, load_s = _timed(lambda: _default_pipeline(spec, device), device)
    else:
        pipe, load_s = _timed(
            lambda: Pipeline.from_pretrained(
                spec["folder"],
                device=device,
                dtype=getattr(torch, mode.get("storage", spec["dtype"])),
                compute_dtype=getattr(torch, spec["dtype"]),
                int8=mode.get("int8", False),
                winograd=mode.get("winograd", True),
            ),
            device,
        )
    if mode.get("few_step"):
        _merge_random_turbo_lora(pipe)
    guidance = mode.get("guidance", GUIDANCE)
    single_pass = guidance == 1.0 or mode.get("few_step", False)

    def encode():
        cond = pipe.encode_prompts([PROMPT])
        return cond, (pipe.encode_prompts([""]) if not single_pass else None)

    monitor.enter("encode")
    encode()  # warm-up: first-call costs (kernel selection) are not the encoder's
    (cond, uncond), encode_s = _timed(encode, device)
    encode_flops = _flops(encode)
    if spec.get("save_context"):
        torch.save({"cond": cond.float().cpu(), "uncond": uncond.float().cpu()}, spec["save_context"])
    del cond, uncond

    cycle = mode.get("cache_interval", 1)
    steps = cycle * (1 + spec["timed"])
    request = pipe.validate(
        PROMPT, num_frames=spec["frames"], height=spec["size"], width=spec["size"], steps=steps,
        guidance_scale=guidance, seed=SEED, cache_interval=cycle,
    )  # fmt: skip
    # the explicit modes keep the plan they were measured with (guidance batched unless --low-memory); the defaults
    # let the library choose by size, as `cinematic generate` does
    memory = pipe.fit(request, None if defaults else Memory.low() if mode.get("low_memory") else Memory())
    clock = StepClock(device, cycle)
    monitor.enter("steps")
    clock.start()
    latents = pipe.sample(request, progress=False, memory=memory, callback=lambda i, n: clock.step_done())
    clock.sampling_done()
    monitor.enter("decode")
    _, decode_s = _timed(lambda: pipe.decode(latents, chunk=memory.decode_chunk), device)
    plan = {
        "storage": str(next(pipe.model.unet.parameters()).dtype),
        "compute": str(pipe.dtype),
        "batched_guidance": memory.batched_guidance,
        "free_text_encoder": memory.free_text_encoder,
    }
    emit({"import_s": import_s, "load_s": load_s, "encode_s": encode_s, "decode_s": decode_s, "rss_base": rss_base,
          "plan": plan, **clock.result(encode_flops), **_memory(device, monitor)})  # fmt: skip


def _merge_random_turbo_lora(pipe) -> None:
    """Load a random T2V-Turbo-MS-shaped list (rank 32 over every layer, with the guidance embedding) merged, as
    ``--lora unet_lora.pt --lora-merge`` does; outside the timed load. The sampler becomes the student's (lcm)."""
    import tempfile

    import torch
    from tests.test_fewstep_unet import turbo_list_for

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "unet_lora.pt"
        torch.save(turbo_list_for(pipe.model.unet, rank=32), path)
        pipe.load_lora(path, merge=True)
    assert pipe.model.config.defaults.sampler == "lcm", pipe.model.config.defaults


def _default_pipeline(spec: dict[str, Any], device):
    """A pipeline as ``cinematic generate --model FOLDER`` makes it: no dtype named (so the library picks by the
    model's size and the files' precision), the text encoder freed once the prompts are encoded."""
    from dataclasses import replace

    from cinematic.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(spec["folder"], device=device, variant=spec.get("variant"))
    pipe.memory = replace(pipe.memory, free_text_encoder=True)
    return pipe


class _FirstStep(Exception):
    """Raised by a forward pre-hook on the UNet to end a run when its first denoising pass begins."""


def first_step(spec: dict[str, Any]) -> None:
    """Time to first step: from the load call to the moment the first UNet pass of a whole generation begins
    (load, prompt encoding, the memory plan and the initial noise; imports excluded), for the library's default path
    of each implementation: ``Pipeline.from_pretrained`` + ``pipe(...)`` against diffusers' fp32
    ``TextToVideoSDPipeline`` + ``pipe(...)``."""
    torch = _torch(spec)
    device = spec["device"]
    settings = {"num_frames": spec["frames"], "height": spec["size"], "width": spec["size"],
                "num_inference_steps": 50, "guidance_scale": GUIDANCE}  # fmt: skip
    if spec["impl"] == "cinematic":
        import cinematic.models.presets  # noqa: F401  (imports are not the load)
        import cinematic.tokenizer  # noqa: F401
        from cinematic.pipeline import Pipeline  # noqa: F401

        _as_the_cli(device)

        def load():
            return _default_pipeline(spec, device)

        def unet(pipe):
            return pipe.model.unet

        def run(pipe):
            pipe(PROMPT, progress=False, seed=SEED, **settings)

    else:
        _import_diffusers()

        def load():
            return _diffusers_pipeline(spec["folder"], getattr(torch, spec["dtype"])).to(device)

        def unet(pipe):
            return pipe.unet

        def run(pipe):
            pipe(PROMPT, generator=torch.Generator("cpu").manual_seed(SEED), output_type="latent", **settings)

    _sync(device)
    start = time.perf_counter()
    pipe = load()
    loaded = time.perf_counter()
    stamps = []

    def stop(module, args):
        _sync(device)
        stamps.append(time.perf_counter())
        raise _FirstStep

    unet(pipe).register_forward_pre_hook(stop)
    try:
        with torch.inference_mode():
            run(pipe)
    except _FirstStep:
        pass
    if not stamps:
        raise RuntimeError("the UNet was never called")
    emit({"load_s": loaded - start, "first_step_s": stamps[0] - start, "peak_rss": peak_rss()})


# ---------------------------------------------------------------------------------------------------------------------
# diffusers


def _import_diffusers() -> None:
    """What ``from_pretrained`` imports lazily (the pipeline class, transformers' CLIP), imported up front."""
    from diffusers import AutoencoderKL, TextToVideoSDPipeline, UNet3DConditionModel  # noqa: F401
    from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401


def _diffusers_pipeline(folder: str, dtype):
    from diffusers import TextToVideoSDPipeline
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()
    pipe = TextToVideoSDPipeline.from_pretrained(folder, torch_dtype=dtype, variant="fp16")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_generation(spec: dict[str, Any]) -> None:
    start = time.perf_counter()
    torch = _torch(spec)
    _import_diffusers()  # counted in import_s, not in the load

    device, dtype = spec["device"], getattr(torch, spec["dtype"])
    rss_base = current_rss()
    import_s = time.perf_counter() - start
    monitor = RssMonitor()
    monitor.enter("load")
    pipe, load_s = _timed(lambda: _diffusers_pipeline(spec["folder"], dtype).to(device), device)
    monitor.enter("encode")

    def encode():
        with torch.inference_mode():
            return pipe.encode_prompt(PROMPT, torch.device(device), 1, True, None)

    encode()
    _, encode_s = _timed(encode, device)
    encode_flops = _flops(encode)
    clock = StepClock(device, 1)
    generator = torch.Generator("cpu").manual_seed(SEED)
    monitor.enter("steps")
    clock.start()
    with torch.inference_mode():
        latents = pipe(
            PROMPT, num_frames=spec["frames"], height=spec["size"], width=spec["size"],
            num_inference_steps=1 + spec["timed"], guidance_scale=GUIDANCE, generator=generator,
            output_type="latent", callback=lambda i, t, x: clock.step_done(), callback_steps=1,
        ).frames  # fmt: skip
        monitor.enter("decode")
        _, decode_s = _timed(lambda: pipe.decode_latents(latents), device)
    clock.sampling_done()
    emit({"import_s": import_s, "load_s": load_s, "encode_s": encode_s, "decode_s": decode_s, "rss_base": rss_base,
          **clock.result(encode_flops), **_memory(device, monitor)})  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# the ModelScope original


def _modelscope_configuration(folder: str) -> dict[str, Any]:
    return json.loads((Path(folder) / "configuration.json").read_text())["model"]


def _modelscope_networks(folder: str, model: str, device, dtype):
    """UNetSD and AutoencoderKL built and loaded as ModelScope's ``TextToVideoSynthesis`` builds them: the UNet
    from ``model_cfg``, the VAE from its ``ddconfig`` (hard-coded there for the full model; ours for tiny). Its
    OpenCLIP text encoder needs the ``open_clip`` package, which is not installed (see bench.py)."""
    import torch
    from modelscope.models.multi_modal.video_synthesis.autoencoder import AutoencoderKL

    configuration = _modelscope_configuration(folder)
    cfg, args = configuration["model_cfg"], configuration["model_args"]
    unet = unetsd_from_cfg(cfg)
    unet.load_state_dict(torch.load(Path(folder) / args["ckpt_unet"]), strict=True)
    unet = unet.eval().to(device, dtype)
    vae_config = model_config(model).vae
    checkpoint = str(Path(folder) / args["ckpt_autoencoder"])
    vae = AutoencoderKL(ldm_ddconfig(vae_config), vae_config.latent_channels, checkpoint)
    return unet, vae.eval().to(device, dtype)


def modelscope_generation(spec: dict[str, Any]) -> None:
    start = time.perf_counter()
    torch = _torch(spec)
    import modelscope.models.multi_modal.video_synthesis.autoencoder  # noqa: F401  (counted in import_s)
    from modelscope.models.multi_modal.video_synthesis.diffusion import GaussianDiffusion, beta_schedule

    device, dtype = spec["device"], getattr(torch, spec["dtype"])
    rss_base = current_rss()
    import_s = time.perf_counter() - start
    monitor = RssMonitor()
    monitor.enter("load")
    (unet, vae), load_s = _timed(lambda: _modelscope_networks(spec["folder"], spec["model"], device, dtype), device)
    # The text features cinematic's case encoded (the same as OpenCLIP's, tested); random ones if it did not run.
    if spec.get("context") and Path(spec["context"]).is_file():
        context = torch.load(spec["context"])
    else:
        width = _modelscope_configuration(spec["folder"])["model_cfg"]["unet_context_dim"]
        context = {"cond": torch.randn(1, 77, width), "uncond": torch.randn(1, 77, width)}
    cond, uncond = context["cond"].to(device, dtype), context["uncond"].to(device, dtype)
    diffusion = GaussianDiffusion(
        betas=beta_schedule("linear_sd", 1000, init_beta=0.00085, last_beta=0.0120),
        mean_type="eps", var_type="fixed_small", loss_type="mse", rescale_timesteps=False,
    )  # fmt: skip
    clock = StepClock(device, 1)
    calls = []

    def model(x, t, y):  # ddim_sample_loop runs the conditional, then the unconditional pass of each step
        out = unet(x, t, y)
        calls.append(1)
        if len(calls) % 2 == 0:
            clock.step_done()
        return out

    noise = _noise(spec).to(device, dtype)
    monitor.enter("steps")
    clock.start()
    # ddim_sample_loop strides 1000 // steps through the timesteps: 1 + timed steps when that divides 1000.
    x0 = diffusion.ddim_sample_loop(
        noise, model, model_kwargs=[{"y": cond}, {"y": uncond}], guide_scale=GUIDANCE,
        ddim_timesteps=1 + spec["timed"], eta=0.0,
    )  # fmt: skip
    clock.sampling_done()

    def decode():  # as TextToVideoSynthesis.forward: every frame in one call
        with torch.no_grad():
            b, c, f, h, w = x0.shape
            z = (x0 / 0.18215).permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)  # [B,C,F,h,w] -> [(B F),C,h,w]
            return vae.decode(z)

    monitor.enter("decode")
    _, decode_s = _timed(decode, device)
    emit({"import_s": import_s, "load_s": load_s, "encode_s": None, "decode_s": decode_s, "rss_base": rss_base,
          **clock.result(0), **_memory(device, monitor)})  # fmt: skip


GENERATIONS = {
    "cinematic": cinematic_generation,
    "diffusers": diffusers_generation,
    "modelscope": modelscope_generation,
}


# ---------------------------------------------------------------------------------------------------------------------
# loads, the matmul peak, quality


def load_case(spec: dict[str, Any]) -> None:
    """One load from one format; the time includes reading one element per page of every weight (``touch``), so
    lazily mapped files count as loaded only once they are in memory."""
    torch = _torch(spec)
    device, dtype = spec["device"], getattr(torch, spec["dtype"])
    if spec["loader"] == "cinematic":
        import cinematic.models.presets  # noqa: F401  (the networks' modules: imports are not the load)
        import cinematic.tokenizer  # noqa: F401
        from cinematic.models import precision  # noqa: F401
        from cinematic.pipeline import Pipeline

        _as_the_cli(device)

        def run():  # as generation loads: kept in the files' fp16 and computed in dtype, with "storage"
            if spec.get("storage") == "default":  # the library's choice, as `cinematic generate` loads
                pipe = _default_pipeline(spec, device)
                return [pipe.model.unet, pipe.model.text_encoder, pipe.model.vae]
            storage = getattr(torch, spec["storage"]) if spec.get("storage") else dtype
            pipe = Pipeline.from_pretrained(
                spec["folder"], device=device, dtype=storage, compute_dtype=dtype, variant=spec.get("variant")
            )
            return [pipe.model.unet, pipe.model.text_encoder, pipe.model.vae]

    elif spec["loader"] == "diffusers":
        _import_diffusers()  # imports are not the load

        def run():
            pipe = _diffusers_pipeline(spec["folder"], dtype).to(device)
            return [pipe.unet, pipe.text_encoder, pipe.vae]

    else:
        import modelscope.models.multi_modal.video_synthesis.autoencoder  # noqa: F401  (imports are not the load)
        import modelscope.models.multi_modal.video_synthesis.unet_sd  # noqa: F401

        def run():
            return list(_modelscope_networks(spec["folder"], spec["model"], device, dtype))

    rss_base = current_rss()
    modules, load_s = _timed(lambda: (m := run(), touch(m))[0], device)
    emit({"load_s": load_s, "weights_bytes": tensor_bytes(modules), "peak_delta": peak_rss() - rss_base})


def matmul_peak(spec: dict[str, Any]) -> None:
    """The best GFLOP/s of square matmuls in the compute dtype: the machine's practical ceiling."""
    torch = _torch(spec)
    device, dtype = spec["device"], getattr(torch, spec["dtype"])
    n = 4096 if torch.device(device).type == "cuda" else 2048
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    best = 0.0
    for _ in range(4):  # the first window is a warm-up as much as a measurement
        count, (_, seconds) = 0, _timed(lambda: a @ b, device)
        start = time.perf_counter()
        while time.perf_counter() - start < spec.get("seconds", 1.0):
            _, s = _timed(lambda: a @ b, device)
            seconds += s
            count += 1
        best = max(best, 2 * n**3 * (count + 1) / seconds / 1e9)
    emit({"gflops": best, "n": n})


QUALITY_MODES = {
    # name: (sampler, steps key, pipeline settings, load settings)
    "ddim (reference)": ("ddim", "reference_steps", {}, {}),
    "dpmpp_2m": ("dpmpp_2m", "steps", {}, {}),
    "dpmpp_2m + cache 3": ("dpmpp_2m", "steps", {"cache_interval": 3}, {}),
    "dpmpp_2m + guidance stop 0.8": ("dpmpp_2m", "steps", {"guidance_stop": 0.8}, {}),
    "dpmpp_2m + cache 3 + stop 0.8": ("dpmpp_2m", "steps", {"cache_interval": 3, "guidance_stop": 0.8}, {}),
    "dpmpp_2m + int8": ("dpmpp_2m", "steps", {}, {"int8": True}),
}


def redraw(module, seed: int):
    """Give every parameter new random values at the scale of a trained network's: matrices and kernels
    ``N(0, 1/fan_in)``, norm scales ``1 + N(0, 0.1)``, biases ``N(0, 0.1)``; deterministic in ``seed``.

    The model folders' weights (uniform in +-0.03, as ``load.random_fp16`` draws them for speed) make the UNet's
    output nearly independent of its input, so an approximation in it would not show in the final latents."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if p.ndim > 1:
                p.copy_(noise / p[0].numel() ** 0.5)
            else:
                p.copy_(0.1 * noise + (1.0 if name.endswith("weight") else 0.0))
    return module


def quality(spec: dict[str, Any]) -> None:
    """Final latents of each fast mode against full computation with the same sampler and steps (and DPM-Solver++
    against DDIM 50): the relative error ``|x - x_ref| / |x_ref|``, on the preset's model (weights re-drawn, see
    :func:`redraw`) and clip."""
    torch = _torch(spec)
    from cinematic.models.precision import quantize_int8
    from cinematic.pipeline import Pipeline

    device = spec["device"]
    _as_the_cli(device)
    dtype = getattr(torch, spec["dtype"])
    pipes: dict[bool, Pipeline] = {}
    results: dict[str, Any] = {}
    for name, (sampler, steps_key, settings, load) in QUALITY_MODES.items():
        int8 = load.get("int8", False)
        if int8 and (torch.device(device).type != "cpu" or dtype != torch.float32):
            continue
        if int8 not in pipes:
            pipes.clear()  # one model in memory at a time
            pipe = None
            pipe = Pipeline.from_pretrained(spec["folder"], device=device, dtype=dtype)
            redraw(pipe.model.unet, 1)
            redraw(pipe.model.text_encoder, 2)
            if int8:
                quantize_int8(pipe.model.unet)
            pipes[int8] = pipe
        pipe = pipes[int8]
        request = pipe.validate(
            PROMPT, num_frames=spec["frames"], height=spec["size"], width=spec["size"], steps=spec[steps_key],
            guidance_scale=GUIDANCE, seed=SEED, sampler=sampler, **settings,
        )  # fmt: skip
        latents, seconds = _timed(lambda pipe=pipe, request=request: pipe.sample(request, progress=False), device)
        results[name] = {"latents": latents.float().cpu(), "seconds": seconds, "steps": spec[steps_key]}
    out = {}
    for name, r in results.items():
        ref = "ddim (reference)" if name == "dpmpp_2m" else "dpmpp_2m"
        error = None
        if name != "ddim (reference)":
            error = ((r["latents"] - results[ref]["latents"]).norm() / results[ref]["latents"].norm()).item()
        out[name] = {"against": None if error is None else ref, "relative_error": error, "seconds": r["seconds"],
                     "steps": r["steps"]}  # fmt: skip
    emit({"modes": out})


JUDGE_MODES = {
    "ddim 50": ("ddim", 50, {}),
    "dpmpp_2m 25": ("dpmpp_2m", 25, {}),
    "dpmpp_2m 25 + cache 3": ("dpmpp_2m", 25, {"cache_interval": 3}),
    "dpmpp_2m 25 + guidance stop 0.8": ("dpmpp_2m", 25, {"guidance_stop": 0.8}),
    "dpmpp_2m 25 + cache 3 + stop 0.8": ("dpmpp_2m", 25, {"cache_interval": 3, "guidance_stop": 0.8}),
}


def judge(spec: dict[str, Any]) -> None:
    """The bundled shapes model judged by ``cinematic.eval`` with each fast mode: ``seeds`` videos per caption,
    video ``s`` from seed ``s`` as ``cinematic eval`` makes them."""
    _torch(spec)
    from cinematic.data.shapes import ALL_CAPTIONS
    from cinematic.eval.judge import evaluate
    from cinematic.pipeline import Pipeline

    pipe = Pipeline.from_pretrained("shapes", device=spec["device"])
    d = pipe.model.config.defaults
    out = {}
    for name, (sampler, steps, settings) in JUDGE_MODES.items():
        if spec.get("settings") and name not in spec["settings"]:
            continue
        videos: dict[str, list] = {caption: [] for caption in ALL_CAPTIONS}
        start = time.perf_counter()
        for seed in range(spec["seeds"]):
            request = pipe.validate(
                list(ALL_CAPTIONS), num_frames=d.frames, height=d.height, width=d.width, num_inference_steps=steps,
                guidance_scale=GUIDANCE, seed=seed, sampler=sampler, same_seed=True, **settings,
            )  # fmt: skip
            for caption, frames in zip(ALL_CAPTIONS, pipe.decode(pipe.sample(request, progress=False))):
                videos[caption].append(frames.numpy())
        seconds = time.perf_counter() - start
        report = evaluate(videos)
        clips = report.seen.clips + report.held_out.clips
        overall = (report.seen.all * report.seen.clips + report.held_out.all * report.held_out.clips) / clips
        out[name] = {"all": overall, "seen_all": report.seen.all, "held_out_all": report.held_out.all,
                     "clips": clips, "seconds_per_video": seconds / clips}  # fmt: skip
    emit({"modes": out})


def make_child(spec: dict[str, Any]) -> None:
    from _bench_models import make_folders, model_folders

    make_folders(spec["model"], model_folders(Path(spec["workdir"]), spec["model"]), set(spec["layouts"]))
    emit({"ok": True})


CHILDREN = {"generation": lambda spec: GENERATIONS[spec["impl"]](spec), "load": load_case, "matmul": matmul_peak,
            "first_step": first_step,
            "quality": quality, "judge": judge, "make": make_child}  # fmt: skip
