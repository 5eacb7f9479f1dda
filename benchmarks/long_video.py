"""Long videos and prompt schedules, measured with the shapes model and its judge (issue 7's acceptance).

Three measurements, printed as a table and optionally written as JSON:

1. **Consistency**: one ``--frames`` (64) video per caption and seed, windows of the model's 16 frames. Each
   16-frame quarter is judged alone; a video keeps its object when every quarter reads the same colour and the same
   shape (and, reported beside it, when those are the caption's).
2. **Direction switch**: ``"0: a red circle moving right | 32: a red circle moving left"`` (each caption against its
   opposite direction); a video passes when frames 0-31 move the first way and frames 32-63 the other.
3. **Memory**: peak RSS of a whole generation (load, sample, decode) of 16 frames and of ``--frames`` frames, each
   in its own child process, and their ratio: at the model's size, and at ``--memory-size`` (256x256, two steps;
   the peak does not depend on the step count), where the UNet's activations, not the interpreter, make the peak.
   Beside them, ``--frames`` frames in one piece (``window=0``), to show what the windows save.

    .venv/bin/python benchmarks/long_video.py --json build/long-video.json

``--fusion`` replaces, in this process only, how the windows' predictions are combined (the consistency measurement
alone; see FUSIONS), to compare the library's plain mean with the schedules docs/video-to-video.md reports:

    .venv/bin/python benchmarks/long_video.py --fusion tent --seeds 4 --skip switch memory --json build/tent.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}
FUSIONS = {
    "mean": "the library's: windows every W/2 frames, each frame the plain mean of the windows holding it",
    "tent": "windows every W/2 frames, each frame weighted by min(i + 1, W - i), i its place in the window "
    "(FreeNoise-style; the library's fusion before session 12)",
    "tent-squared": "windows every W/2 frames, the tent weight squared",
    "round-robin-8": "non-overlapping windows (shorter ones at the ends), their offset alternating 0 / W/2 frames "
    "from step to step; no averaging",
    "round-robin-4": "non-overlapping windows, their offset advancing W/4 frames every step; no averaging",
}


def use_fusion(name: str) -> None:
    """Make every :class:`cinematic.diffusion.windows.WindowedEps` of this process fuse as ``name`` (FUSIONS). For
    one prompt per video, as the consistency measurement has, every window's network is the same, so the round-robin
    schedules may place windows anywhere."""
    import torch

    from cinematic.diffusion.windows import WindowedEps

    if name == "mean":
        return

    def weighted(self, x, t):
        total, weight = torch.zeros_like(x), torch.zeros((1, 1, x.shape[2], 1, 1), dtype=x.dtype, device=x.device)
        place = torch.arange(self.window, dtype=x.dtype, device=x.device)
        tent = torch.minimum(place + 1, self.window - place).view(1, 1, -1, 1, 1)
        tent = tent**2 if name == "tent-squared" else tent
        for model, s in zip(self.models, self.starts):
            total[:, :, s : s + self.window] += tent * model(x[:, :, s : s + self.window], t)
            weight[:, :, s : s + self.window] += tent
        return total / weight

    def round_robin(self, x, t):
        step = getattr(self, "_steps", 0)
        self._steps = step + 1
        shift = self.window // 2 if name == "round-robin-8" else self.window // 4
        offset = (step * shift) % self.window if name == "round-robin-4" else (step % 2) * shift
        edges = sorted({0, x.shape[2], *range(offset, x.shape[2], self.window)})
        out = torch.empty_like(x)
        for a, b in zip(edges, edges[1:]):
            out[:, :, a:b] = self.models[0](x[:, :, a:b], t)
        return out

    WindowedEps.__call__ = round_robin if name.startswith("round-robin") else weighted


def captions_for(count: int) -> list[str]:
    """``count`` training captions spread over the list, so that every colour, shape and direction appears."""
    from cinematic.data.shapes import TRAIN_CAPTIONS

    step = max(1, len(TRAIN_CAPTIONS) // count)
    return list(TRAIN_CAPTIONS[::step][:count])


def consistency(pipe, captions: list[str], seeds: int, frames: int, steps: int) -> dict:
    from cinematic.data.shapes import parse_caption
    from cinematic.eval.judge import judge_video

    kept = matched = total = 0
    rows = []
    for seed in range(seeds):
        request = pipe.validate(captions, num_frames=frames, num_inference_steps=steps, seed=seed, same_seed=True)
        videos = [v.cpu().numpy() for v in pipe.decode(pipe.sample(request, progress=False))]
        for caption, video in zip(captions, videos):
            colour, shape, _ = parse_caption(caption)
            quarters = [judge_video(video[q : q + 16]) for q in range(0, frames - 15, 16)]
            colours, shapes = [v.colour for v in quarters], [v.shape for v in quarters]
            keeps = None not in colours and None not in shapes and len(set(colours)) == len(set(shapes)) == 1
            right = keeps and colours[0] == colour and shapes[0] == shape
            kept, matched, total = kept + keeps, matched + right, total + 1
            rows.append({"caption": caption, "seed": seed, "colours": colours, "shapes": shapes, "keeps": keeps})
    return {"videos": total, "keeps": kept / total, "keeps_and_matches_caption": matched / total, "rows": rows}


def switch(pipe, captions: list[str], seeds: int, frames: int, steps: int) -> dict:
    from cinematic.data.shapes import caption_of, parse_caption
    from cinematic.eval.judge import judge_video

    half = frames // 2
    passed = total = 0
    rows = []
    for seed in range(seeds):
        for caption in captions:
            colour, shape, direction = parse_caption(caption)
            then = caption_of(colour, shape, OPPOSITE[direction])
            schedule = f"0: {caption} | {half}: {then}"
            video = pipe("", prompt_schedule=schedule, num_frames=frames, steps=steps, seed=seed, progress=False)
            frames_np = video.frames.cpu().numpy()
            first, second = judge_video(frames_np[:half]).direction, judge_video(frames_np[half:]).direction
            ok = first == direction and second == OPPOSITE[direction]
            passed, total = passed + ok, total + 1
            rows.append({"schedule": schedule, "seed": seed, "first": first, "second": second, "passed": ok})
    return {"videos": total, "passed": passed / total, "rows": rows}


CHILD = """
import resource, sys, torch
torch.set_num_threads(1)
from cinematic.allocator import keep_freed_memory
keep_freed_memory()  # as `cinematic generate` does on the CPU
from cinematic.pipeline import Pipeline
pipe = Pipeline.from_pretrained({model!r})
video = pipe("a red circle moving right", num_frames={frames}, steps={steps}, seed=0, progress=False, **{extra!r})
assert video.frames.shape[0] == {frames}
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_rss_mb(model: str, frames: int, steps: int, **extra) -> float:
    """Peak RSS (MiB) of a child process that loads the model and makes one ``frames``-frame video (``extra``: more
    arguments of the call, such as ``height``)."""
    code = CHILD.format(model=model, frames=frames, steps=steps, extra=extra)
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return int(out.split()[-1]) / 1024  # Linux reports KiB


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="shapes")
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--captions", type=int, default=8, help="training captions to use (default 8)")
    parser.add_argument("--seeds", type=int, default=8, help="videos per caption (default 8)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--memory-size", type=int, default=256, help="frame size of the second memory row")
    parser.add_argument("--skip", nargs="*", default=[], choices=["consistency", "switch", "memory"])
    parser.add_argument("--fusion", choices=list(FUSIONS), default="mean", help="how windows combine (see FUSIONS)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.fusion != "mean" and {"switch", "memory"} - set(args.skip):
        parser.error("--fusion other than mean measures consistency alone: add --skip switch memory")

    import torch

    from cinematic.pipeline import Pipeline

    torch.set_num_threads(1)
    use_fusion(args.fusion)
    pipe = Pipeline.from_pretrained(args.model)
    captions = captions_for(args.captions)
    report: dict = {"settings": vars(args) | {"json": None, "captions": captions, "fusion_means": FUSIONS[args.fusion]}}
    began = time.perf_counter()
    if "consistency" not in args.skip:
        report["consistency"] = consistency(pipe, captions, args.seeds, args.frames, args.steps)
        print(f"consistency done, {time.perf_counter() - began:.0f} s", file=sys.stderr)
    if "switch" not in args.skip:
        report["switch"] = switch(pipe, captions, args.seeds, args.frames, args.steps)
        print(f"switch done, {time.perf_counter() - began:.0f} s", file=sys.stderr)
    if "memory" not in args.skip:
        short, long = peak_rss_mb(args.model, 16, args.steps), peak_rss_mb(args.model, args.frames, args.steps)
        report["memory"] = {"peak_rss_mb_16": round(short, 1), f"peak_rss_mb_{args.frames}": round(long, 1)}
        report["memory"]["ratio"] = round(long / short, 3)
        sized = dict(height=args.memory_size, width=args.memory_size, steps=2)
        short, long = peak_rss_mb(args.model, 16, **sized), peak_rss_mb(args.model, args.frames, **sized)
        whole = peak_rss_mb(args.model, args.frames, window=0, **sized)
        report["memory_at_size"] = {
            "size": args.memory_size,
            "steps": 2,
            "peak_rss_mb_16": round(short, 1),
            f"peak_rss_mb_{args.frames}": round(long, 1),
            f"peak_rss_mb_{args.frames}_one_piece": round(whole, 1),
            "ratio": round(long / short, 3),
            "ratio_one_piece": round(whole / short, 3),
        }

    print(f"| measurement ({args.frames} frames, {args.captions} captions x {args.seeds} seeds) | result | bar |")
    print("| --- | --- | --- |")
    if "consistency" in report:
        c = report["consistency"]
        print(f"| keeps colour and shape in all four 16-frame quarters | {c['keeps']:.1%} | >= 90% |")
        print(f"| ... and they are the caption's | {c['keeps_and_matches_caption']:.1%} | |")
    if "switch" in report:
        print(f"| direction switch at frame {args.frames // 2} followed | {report['switch']['passed']:.1%} | >= 80% |")
    if "memory" in report:
        m = report["memory"]
        print(f"| peak RSS, {args.frames} frames / 16 frames | {m['ratio']:.2f}x | <= 1.3x |")
        m = report["memory_at_size"]
        at = f"{m['size']}x{m['size']}"
        print(f"| peak RSS at {at}, {args.frames} frames / 16 frames | {m['ratio']:.2f}x | <= 1.3x |")
        print(f"| ... {args.frames} frames in one piece (`window=0`) / 16 frames | {m['ratio_one_piece']:.2f}x | |")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
