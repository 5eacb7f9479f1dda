"""Latent consistency distillation (Song et al. 2023; Luo et al. 2023, "Latent Consistency Models"): make a few-step
student of any model cinematic loads. ``distill(DistillConfig(...)) -> Path`` and ``cinematic distill``.

The run is a ``cinematic train`` run (``train/loop.py``: the same data, batches, checkpoints, exact resume, samples,
progress and many-process launch) whose loss is the consistency loss of one solver step, as T2V-Turbo and MCM train
their students of text-to-video-ms-1.7b (``../shared/docs/few-step.md``):

1. a clip's latents ``x0`` are noised to ``t`` on the teacher's ``solver_steps``-step DDIM grid (``t = k T/N - 1``);
2. the frozen teacher takes one guided DDIM step from ``t`` to ``t - T/N`` at a guidance scale ``w`` drawn per clip
   from ``[guidance_min, guidance_max]``: ``x0 = x0_u + w (x0_c - x0_u)``, the same for ε (``w`` is the scale that
   ``cinematic generate --guidance-scale`` means: the unconditional prediction plus ``w`` times the difference);
3. the student maps ``x_t`` to ``f(x_t, t) = c_skip(t) x_t + c_out(t) x0_hat`` (the boundary scalings at
   ``timestep_scaling``, :func:`cinematic.diffusion.denoisers.boundary_scalings`), and is pulled towards the
   target's ``f`` at the teacher's ``x_{t - T/N}`` (no gradient) by the pseudo-Huber loss
   ``sqrt(d^2 + c^2) - c`` (Song & Dhariwal 2023).

With ``anchor_steps = M`` (0 by default, LCM's recipe), a clip on one of the lowest ``M`` solver steps is anchored:
the teacher goes on taking guided DDIM steps down to the bottom of the grid, and the target is where it ends (the
boundary, where ``f`` is the identity), so the low-noise end learns the teacher's own trajectory instead of the
target network's estimate of it. It costs up to ``M`` teacher passes for those clips. With ``own_samples = F``, a
fraction ``F`` of the clips is replaced by the target network's one-step sample of its caption (from fresh noise at
the top of the schedule), so the student also learns from the kind of start its few-step sampler gives its later
steps; noised real clips are sharper than those (docs/few-step.md).

The student sees ``w`` through a guidance embedding (``guidance_embedding`` wide, the UNet config's
``time_cond_proj_dim``, started at zero), so each of its steps is one UNet pass at any guidance scale; with
``guidance_embedding=0`` it learns the teacher guided at ``w`` (give one value as the range) without seeing it.

The student is the teacher plus a LoRA on every linear layer and convolution (the default), or with ``lora=None`` a
full copy. Its target is an EMA of it (``target_decay``, 0.95, as LCM's full students: a frozen copy of the UNet, or
for a LoRA student a second adapter on the same layers), or with ``target_decay=0`` the student itself without
gradient (as LCM-LoRA); on the shapes model the EMA target judged better early in a run (docs/few-step.md).

A LoRA run writes checkpoints that ``generate --lora`` loads; their ``lora.json`` carries the sampler settings the
student was made for (``lcm``, 4 steps, the teacher's guidance, this run's timestep scaling) and its guidance
embedding, so the student needs no flags. A full run writes models whose defaults say the same.
"""

from __future__ import annotations

import copy
import dataclasses
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from cinematic.data.dataset import VideoDataset
from cinematic.diffusion.denoisers import boundary_scalings
from cinematic.errors import CinematicError
from cinematic.train.config import FEW_STEPS, DistillConfig
from cinematic.train.distributed import Draws
from cinematic.train.loop import Trainer, first_captions, run_training
from cinematic.train.unet import SampleFn, clean_latents, prompt_sampler

TARGET_ADAPTER = "target"  # a LoRA student's EMA target: a second adapter on the student's layers


def distill(config: DistillConfig, *, dataset: VideoDataset | None = None, sample_fn: SampleFn | None = None):
    """Run ``config``; returns the final folder (``OUT/model``: the student's LoRA, or its model for a full
    student), or the last checkpoint when the run stops at ``config.stop_at``. As :func:`cinematic.train.train`."""
    if not isinstance(config, DistillConfig):
        raise TypeError("distill takes a DistillConfig")
    return run_training(config, dataset, sample_fn, DistillTrainer)


def _x0_and_eps(
    prediction: str, x: torch.Tensor, out: torch.Tensor, signal: torch.Tensor, noise: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean latent and the noise that the network's output ``out`` at ``x = signal x0 + noise eps`` stands for
    (ε- or v-prediction)."""
    if prediction == "v_prediction":
        return signal * x - noise * out, noise * x + signal * out
    return (x - noise * out) / signal, out


def _scalings(t: torch.Tensor, timestep_scaling: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The boundary scalings ``c_skip``, ``c_out`` at each of the timesteps ``t``, as columns."""
    skip, out = zip(*(boundary_scalings(float(s), timestep_scaling) for s in t.tolist()))
    return _column(skip, device), _column(out, device)


def _column(values: list[float] | torch.Tensor, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.float32).view(-1, 1, 1, 1, 1).to(device)


class DistillTrainer(Trainer):
    """A :class:`cinematic.train.loop.Trainer` whose loss is the consistency loss, with the teacher beside the
    student and the EMA target."""

    def __init__(self, run: Any, sample_fn: SampleFn | None):
        c, model = run.config, run.model
        self.teacher: nn.Module | None = None  # a separate teacher (full student); a LoRA student's is itself
        self.target: nn.Module | None = None  # a full student's EMA target (a LoRA student's is an adapter)
        self.target_pairs: dict[str, tuple[nn.Parameter, nn.Parameter]] = {}  # EMA: name -> (target, student)
        defaults = model.config.defaults
        if run.state is None or c.lora is not None:  # the model is the teacher (a LoRA run resumes on it too)
            if model.unet.config.time_cond_proj_dim is not None:
                raise CinematicError(
                    f"{c.init} already has a guidance embedding (a few-step student?); distil the model it came from"
                )
            if c.lora is None:
                self.teacher = _frozen(copy.deepcopy(model.unet))
            if c.guidance_embedding:
                from cinematic.models.unet3d import add_guidance_embedding

                add_guidance_embedding(model.unet, c.guidance_embedding, "distill")
            teacher_guidance = defaults.guidance_scale
        else:  # a full student resumed: its checkpoint holds the student; the teacher is loaded again
            from cinematic.train.setup import load_network

            self.teacher = _frozen(load_network(c.init, "unet", run.device)[0])
            teacher_guidance = run.state["distill_teacher_guidance"]
        self.teacher_guidance = teacher_guidance
        self.few_step = {
            "sampler": "lcm",
            "num_inference_steps": FEW_STEPS,
            "guidance_scale": teacher_guidance if c.guidance_embedding else 1.0,
            "timestep_scaling": float(c.timestep_scaling),
        }
        model.config = dataclasses.replace(model.config, unet=model.unet.config)
        if c.lora is None:  # the saved models are students: their defaults are the few-step sampler's
            model.config = dataclasses.replace(model.config, defaults=dataclasses.replace(defaults, **self.few_step))
        super().__init__(run, sample_fn)
        if c.target_decay > 0:
            self._add_target(run.state)
        schedule = model.config.schedule
        self.solver_stride = schedule.num_train_timesteps // c.solver_steps
        if self.solver_stride < 1:
            raise CinematicError(f"solver steps ({c.solver_steps}) must not exceed the model's "
                                 f"{schedule.num_train_timesteps} training timesteps")  # fmt: skip

    def _add_target(self, state: dict[str, Any] | None) -> None:
        """The EMA target, started at the student (or at the resumed run's target). A full student's is a frozen
        copy of the UNet; a LoRA student's is a second adapter on the same layers (:data:`TARGET_ADAPTER`, at scale 0
        outside the target's pass), so it costs the adapters' memory, not another UNet's."""
        from cinematic.models import lora_adapters

        unet = self.model.unet
        student = {n: p for n, p in unet.named_parameters() if p.requires_grad}
        if self.config.lora is None:
            self.target = _frozen(copy.deepcopy(unet))
            target = dict(self.target.named_parameters())
            self.target_pairs = {n: (target[n], p) for n, p in student.items()}
        else:
            adapter = {k: (d.clone(), u.clone(), a) for k, (d, u, a) in lora_adapters.adapter_state(unet).items()}
            lora_adapters.load_adapter(unet, adapter, TARGET_ADAPTER, scale=0.0, what="the EMA target")
            target = dict(unet.named_parameters())
            names = {n: n.replace(f".{lora_adapters.DEFAULT_NAME}.", f".{TARGET_ADAPTER}.") for n in student}
            self.target_pairs = {names[n]: (target[names[n]], p) for n, p in student.items()}
        for name, (parameter, _) in self.target_pairs.items():
            parameter.requires_grad_(False)
            if state is not None:
                with torch.no_grad():
                    parameter.copy_(state["distill_target"][name])

    @contextmanager
    def _as_target(self):
        """The network of the consistency target: the EMA copy, the UNet with the target adapter switched in for the
        student's, or (``target_decay=0``) the student itself."""
        if self.target is not None or not self.target_pairs:
            yield self.target if self.target is not None else self.model.unet
            return
        with self._only_adapter(TARGET_ADAPTER) as unet:
            yield unet

    @contextmanager
    def _teaching(self):
        """The UNet as the teacher: a LoRA student's adapters are switched off inside the block."""
        if self.teacher is not None:
            yield self.teacher
            return
        with self._only_adapter(None) as unet:
            yield unet

    @contextmanager
    def _only_adapter(self, name: str | None):
        """A LoRA student's UNet with adapter ``name`` alone switched on (None: none, the teacher) inside the block;
        afterwards the student's adapter is on and the target's (when there is one) off again."""
        from cinematic.models import lora_adapters

        unet, student = self.model.unet, lora_adapters.DEFAULT_NAME
        lora_adapters.set_scale(unet, student, 0.0)
        if name is not None:
            lora_adapters.set_scale(unet, name, 1.0)
        try:
            yield unet
        finally:
            if name is not None:
                lora_adapters.set_scale(unet, name, 0.0)
            lora_adapters.set_scale(unet, student, 1.0)

    def loss(self, batch: dict[str, Any], draws: Draws) -> tuple[torch.Tensor, dict[str, float]]:
        c, model = self.config, self.model
        device = model.unet.conv_in.weight.device
        prediction = model.config.schedule.prediction_type
        b = len(batch["caption"])
        dropped = (draws.take(lambda g, n: torch.rand(n, generator=g)) < c.caption_dropout).tolist()
        x0 = clean_latents(model, batch, draws, device)
        k = draws.take(lambda g, n: torch.randint(1, c.solver_steps + 1, (n,), generator=g))
        eps = draws.take(lambda g, n: torch.randn((n, *x0.shape[1:]), generator=g)).to(device)
        w = draws.take(lambda g, n: c.guidance_min + (c.guidance_max - c.guidance_min) * torch.rand(n, generator=g))
        if c.own_samples:  # which clips to replace, and the noise their samples start from
            own = draws.take(lambda g, n: torch.rand(n, generator=g)) < c.own_samples
            z = draws.take(lambda g, n: torch.randn((n, *x0.shape[1:]), generator=g)).to(device)
        t = k * self.solver_stride - 1
        signal, noise = self._signal_and_noise(t, device)
        skip, out = _scalings(t, c.timestep_scaling, device)
        w_dev = w.to(device, torch.float32)
        student_w = {"guidance": w_dev} if c.guidance_embedding else {}

        with torch.no_grad(), self.autocast():
            if "context" in batch:  # cached features of the captions and of ""
                empty = batch["empty_context"].to(device)
                keep = torch.tensor(dropped, device=device).view(b, 1, 1)
                context = torch.where(keep, empty, batch["context"].to(device))
            else:
                captions = ["" if drop else caption for caption, drop in zip(batch["caption"], dropped)]
                context = model.text_encoder(model.tokenizer(captions).to(device))
                empty = model.text_encoder(model.tokenizer([""]).to(device))
            empty = empty.expand(b, *context.shape[1:]) if empty.shape[0] == 1 else empty
            if c.own_samples and own.any():
                on = own.to(device)
                x0 = x0.clone()
                x0[on] = self._one_step_sample(z[on], context[on], w_dev[on])
            x_t = signal * x0 + noise * eps
            # The teacher's guided DDIM step from t to t_prev; clips on the lowest anchor_steps solver steps go on
            # stepping to the clean end (t_prev = 0, where the target is x_prev itself).
            x_prev, t_prev = self._teacher_step(x_t, t, context, empty, w)
            anchored = (k <= c.anchor_steps) & (t_prev > 0)
            while anchored.any():
                on = anchored.to(device)
                x_prev[on], t_prev[anchored] = self._teacher_step(x_prev[on], t_prev[anchored], context[on], empty[on],
                                                                  w[anchored])  # fmt: skip
                anchored &= t_prev > 0
            # The target: the student's consistency function one solver step earlier (its EMA, or itself).
            signal_prev, noise_prev = self._signal_and_noise(t_prev, device)
            skip_prev, out_prev = _scalings(t_prev, c.timestep_scaling, device)
            with self._as_target() as target_net:
                pred_prev = target_net(x_prev, t_prev.to(device, torch.float32), context, **student_w).float()
            target = skip_prev * x_prev + out_prev * _x0_and_eps(prediction, x_prev, pred_prev, signal_prev,
                                                                  noise_prev)[0]  # fmt: skip
        with self.autocast():
            pred = model.unet(x_t, t.to(device, torch.float32), context, **student_w).float()
        student = skip * x_t + out * _x0_and_eps(prediction, x_t, pred, signal, noise)[0]
        huber = torch.sqrt((student - target) ** 2 + c.huber_c**2) - c.huber_c
        return huber.mean(), {}

    def _signal_and_noise(self, t: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``sqrt(alpha_bar)`` and ``sqrt(1 - alpha_bar)`` at each of the timesteps ``t``, as columns."""
        return _column(self.alpha_bar[t].sqrt(), device), _column((1 - self.alpha_bar[t]).sqrt(), device)

    def _one_step_sample(self, z: torch.Tensor, context: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """The target network's one-step sample from the noise ``z`` at the top of the schedule: the estimate that
        the few-step sampler's first step makes, and whose re-noised copies its later steps are given."""
        top = len(self.alpha_bar) - 1
        signal, noise = float(self.alpha_bar[top].sqrt()), float((1 - self.alpha_bar[top]).sqrt())
        skip, out = boundary_scalings(float(top), self.config.timestep_scaling)
        guidance = {"guidance": w} if self.config.guidance_embedding else {}
        with self._as_target() as net:
            pred = net(z, torch.full((len(z),), float(top), device=z.device), context, **guidance).float()
        return skip * z + out * _x0_and_eps(self.model.config.schedule.prediction_type, z, pred, signal, noise)[0]

    def _teacher_step(
        self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, empty: torch.Tensor, w: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen teacher's guided DDIM step from ``x`` at ``t`` one solver step down (to 0 at the bottom), with
        the conditional and unconditional passes in one batch: ``(x_prev, t_prev)``."""
        device, b = x.device, len(t)
        t_prev = (t - self.solver_stride).clamp(min=0)
        signal, noise = self._signal_and_noise(t, device)
        signal_prev, noise_prev = self._signal_and_noise(t_prev, device)
        t_dev = t.to(device, torch.float32)
        with self._teaching() as teacher:
            both = teacher(torch.cat([x, x]), torch.cat([t_dev, t_dev]), torch.cat([context, empty])).float()
        prediction = self.model.config.schedule.prediction_type
        x0_c, eps_c = _x0_and_eps(prediction, x, both[:b], signal, noise)
        x0_u, eps_u = _x0_and_eps(prediction, x, both[b:], signal, noise)
        scale = _column(w, device)
        return signal_prev * (x0_u + scale * (x0_c - x0_u)) + noise_prev * (eps_u + scale * (eps_c - eps_u)), t_prev

    def step(self, step: int, batches: list[dict[str, Any]]) -> dict[str, float]:
        metrics = super().step(step, batches)
        if self.target_pairs:
            with torch.no_grad():
                target, student = zip(*self.target_pairs.values())
                torch._foreach_lerp_(list(target), [p.detach() for p in student], 1.0 - self.config.target_decay)
        return metrics

    def extra_state(self) -> dict[str, Any]:
        extra = {"distill_teacher_guidance": self.teacher_guidance}
        if self.target_pairs:
            extra["distill_target"] = {name: target.detach() for name, (target, _) in self.target_pairs.items()}
        return extra

    def adapter_info(self) -> dict[str, Any]:
        from cinematic.weights.lora_formats import FEW_STEP_KEY, GUIDANCE_KEY

        info: dict[str, Any] = {FEW_STEP_KEY: self.few_step, "distilled_from": str(self.config.init)}
        if self.config.guidance_embedding:
            info[GUIDANCE_KEY] = self.config.guidance_embedding
        return info

    def _default_sampler(self) -> SampleFn | None:
        c = self.config
        prompts = c.sample_prompts or first_captions(self.run.dataset, 2)
        guidance = c.sample_guidance if c.guidance_embedding else 1.0
        settings = {"sampler": "lcm", "timestep_scaling": float(c.timestep_scaling)}
        return prompt_sampler(self.config.out / "samples", prompts, self.run.clip, c.sample_steps, guidance, c.seed,
                              **settings)  # fmt: skip


def _frozen(unet: nn.Module) -> nn.Module:
    unet.requires_grad_(False)
    return unet.eval()
