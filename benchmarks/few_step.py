"""The bundled shapes model's 4-step student (``--lora shapes-turbo``) against its teacher, end to end (issue 24).

One process, one thread count: each case loads the pipeline (``Pipeline.from_pretrained("shapes", loras=...)``, as
``cinematic generate`` does) and makes one default video (16 frames, 32x32: encode, sample, decode), ``--repeats``
times after a warm-up. The table shows the median seconds of the video alone (text encoding, steps and decoding: what
``bench.py``'s whole-video estimate at full size counts) and of the load plus the video, each with its ratio against
the teacher's DDIM 50 with guidance 9 (two UNet passes a step: 100 in all). After a warm-up of each case the cases
take turns, one video each per round, so that the machine's slow and fast spells fall on all of them alike.

    .venv/bin/python benchmarks/few_step.py --json build/few-step.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from _common import machine, markdown_table

PROMPT = "a red circle moving left"
# (label, loras, settings): the teacher with its default sampler and two faster ones, the student at 1 to 8 steps.
CASES = [
    ("teacher, DDIM 50 (the default)", [], {}),
    ("teacher, DPM-Solver++ 25", [], {"sampler": "dpmpp_2m", "num_inference_steps": 25}),
    ("student, lcm 4 (the LoRA's default)", [("shapes-turbo", 1.0)], {}),
    ("student, lcm 4, merged (--lora-merge)", [("shapes-turbo", 1.0)], {"merge": True}),
    ("student, lcm 1", [("shapes-turbo", 1.0)], {"num_inference_steps": 1}),
    ("student, lcm 2", [("shapes-turbo", 1.0)], {"num_inference_steps": 2}),
    ("student, lcm 8", [("shapes-turbo", 1.0)], {"num_inference_steps": 8}),
]


def one_video(loras: list, settings: dict, seed: int) -> tuple[float, float, int]:
    """Seconds of a load and one video, of the video alone, and the UNet passes (batch rows) it took."""
    from cinematic.pipeline import Pipeline

    settings = dict(settings)
    merge = settings.pop("merge", False)  # folded into the weights: no adapter hooks in the steps
    began = time.perf_counter()
    pipe = Pipeline.from_pretrained("shapes", loras=loras, merge_loras=merge)
    rows = [0]
    pipe.model.unet.register_forward_hook(lambda m, inputs, out: rows.__setitem__(0, rows[0] + len(inputs[0])))
    video_began = time.perf_counter()
    pipe(PROMPT, seed=seed, progress=False, **settings)
    done = time.perf_counter()
    return done - began, done - video_began, rows[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed videos per case, after one warm-up")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    for _label, loras, settings in CASES:
        one_video(loras, settings, 0)  # warm-up
    # Round-robin: every round times each case once, so a slow spell of the machine falls on all cases alike.
    timed: list[list[tuple[float, float, int]]] = [[] for _ in CASES]
    for seed in range(args.repeats):
        for runs, (_label, loras, settings) in zip(timed, CASES):
            runs.append(one_video(loras, settings, seed))
    rows = []
    for runs, (label, loras, settings) in zip(timed, CASES):
        times, videos = [r[0] for r in runs], [r[1] for r in runs]
        rows.append({"case": label, "loras": [f"{p}:{s:g}" for p, s in loras], "settings": settings,
                     "median_s": statistics.median(times), "times_s": times,
                     "video_median_s": statistics.median(videos), "video_times_s": videos,
                     "unet_passes": runs[-1][2]})  # fmt: skip
        print(f"{label}: {statistics.median(videos):.3f} s video, {statistics.median(times):.3f} s with the load",
              file=sys.stderr)  # fmt: skip
    teacher, teacher_video = rows[0]["median_s"], rows[0]["video_median_s"]
    for r in rows:  # the video's speed-up in each round, against the teacher's video of the same round
        r["video_round_ratios"] = [t / v for t, v in zip(rows[0]["video_times_s"], r["video_times_s"])]
    table = markdown_table(
        ["case", "UNet passes", "video, s (median)", "speed-up vs DDIM 50", "per round: median (range)",
         "load + video, s", "speed-up vs DDIM 50"],
        [[r["case"], str(r["unet_passes"]), f"{r['video_median_s']:.3f}", f"{teacher_video / r['video_median_s']:.1f}x",
          f"{statistics.median(r['video_round_ratios']):.1f}x ({min(r['video_round_ratios']):.1f}-"
          f"{max(r['video_round_ratios']):.1f})", f"{r['median_s']:.3f}", f"{teacher / r['median_s']:.1f}x"]
         for r in rows],
    )  # fmt: skip
    print(table)
    if args.json is not None:
        result = {"machine": machine(), "threads": torch.get_num_threads(), "repeats": args.repeats, "rows": rows}
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
