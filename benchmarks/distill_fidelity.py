"""How closely a few-step student's one-step map follows its teacher's ODE, timestep by timestep (issue 24).

A consistency student should send any point ``x_t`` of the teacher's guided probability-flow ODE to that ODE's
endpoint. This script runs the teacher's own DDIM trajectory (guidance ``--guidance``, ``--solver-steps`` steps on the
trailing grid, from seed ``--seed``'s noise for every caption), keeps ``x_t`` at the probe timesteps, and prints for
each student (a LoRA folder or file: a ``cinematic distill`` checkpoint, or ``shapes-turbo``) the relative
squared error ``|f(x_t, t) - x_0|^2 / |x_0|^2`` of its boundary-scaled estimate against the trajectory's endpoint
``x_0``. The first row is the teacher's own guided x0 estimate at each probe, where a fresh LoRA student starts.

    .venv/bin/python benchmarks/distill_fidelity.py build/run/checkpoint-000100 build/run/checkpoint-000200

Errors, not times: it may run beside other work.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PROBES = (999, 759, 519, 279, 159, 59)  # the 4-step sampler's timesteps and three lower ones


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("students", nargs="+", help="LoRA checkpoints or files of the students to measure")
    parser.add_argument("--model", default="shapes", help="the teacher (default: shapes)")
    parser.add_argument("--seed", type=int, default=100, help="the noise of every caption's trajectory (default 100)")
    parser.add_argument("--captions", type=int, default=16, help="shapes captions, every third (default 16)")
    parser.add_argument("--guidance", type=float, default=9.0, help="the teacher's guidance scale (default 9)")
    parser.add_argument("--solver-steps", type=int, default=50, help="DDIM steps of the teacher (default 50)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    import torch

    from cinematic.data.shapes import ALL_CAPTIONS
    from cinematic.diffusion.denoisers import boundary_scalings
    from cinematic.pipeline import Pipeline

    if args.threads:
        torch.set_num_threads(args.threads)
    captions = list(ALL_CAPTIONS)[:: max(1, len(ALL_CAPTIONS) // args.captions)][: args.captions]
    teacher = Pipeline.from_pretrained(args.model, device="cpu")
    if teacher.model.config.schedule.prediction_type != "v_prediction":
        raise SystemExit("error: this probe reads v-prediction teachers (the shapes model)")
    alpha_bar, n = teacher.alpha_bar.double(), len(captions)
    stride = teacher.model.config.schedule.num_train_timesteps // args.solver_steps
    grid = list(range(teacher.model.config.schedule.num_train_timesteps - 1, 0, -stride))

    def scales(t: int) -> tuple[float, float]:
        a = float(alpha_bar[t])
        return a**0.5, (1 - a) ** 0.5

    with torch.inference_mode():
        context = teacher.encode_prompts(captions)
        empty = teacher.encode_prompts([""]).expand_as(context)
        x = teacher.initial_noise(teacher.validate(captions, same_seed=True, seed=args.seed))[0].float()
        points, estimates = {}, {}
        for i, t in enumerate(grid):
            points[t] = x.clone()
            v = teacher.model.unet(torch.cat([x, x]), torch.full((2 * n,), float(t)), torch.cat([context, empty]))
            v = v[n:].float() + args.guidance * (v[:n].float() - v[n:].float())
            signal, noise = scales(t)
            x0, eps = signal * x - noise * v, noise * x + signal * v
            estimates[t] = x0
            if i + 1 == len(grid):
                break
            signal_next, noise_next = scales(grid[i + 1])
            x = signal_next * x0 + noise_next * eps
        end = x0
        probes = [t for t in PROBES if t in points] or grid[:: max(1, len(grid) // 6)]

        def error(estimate: torch.Tensor) -> float:
            return float((estimate - end).pow(2).mean() / end.pow(2).mean())

        rows = [{"student": "teacher's x0 estimate", **{str(t): error(estimates[t]) for t in probes}}]
        for spec in args.students:
            student = Pipeline.from_pretrained(args.model, device="cpu", loras=[(spec, 1.0)])
            unet, scaling = student.model.unet, student.model.config.defaults.timestep_scaling
            embedded = unet.config.time_cond_proj_dim is not None
            guidance = {"guidance": torch.full((n,), args.guidance)} if embedded else {}
            row = {"student": spec}
            for t in probes:
                signal, noise = scales(t)
                v = unet(points[t], torch.full((n,), float(t)), context, **guidance).float()
                skip, out = boundary_scalings(float(t), scaling)
                row[str(t)] = error(skip * points[t] + out * (signal * points[t] - noise * v))
            rows.append(row)
            print(f"{spec}: " + " ".join(f"t={t} {row[str(t)]:.4f}" for t in probes), file=sys.stderr)

    print("| student | " + " | ".join(f"t = {t}" for t in probes) + " |")
    print("| --- |" + " --- |" * len(probes))
    for row in rows:
        print(f"| {row['student']} | " + " | ".join(f"{row[str(t)]:.4f}" for t in probes) + " |")
    if args.json is not None:
        settings = {k: getattr(args, k) for k in ("model", "seed", "captions", "guidance", "solver_steps")}
        args.json.write_text(json.dumps({"settings": settings, "probes": probes, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
