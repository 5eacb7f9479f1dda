"""Issue 23's probe, re-run end to end: what a careless or hostile user can do to ``cinematic`` and ``cinematic
serve``, each case judged by what it must give.

    python benchmarks/probe.py --json /tmp/probe.json     # 7 to 15 min on 2 shared cores
    python benchmarks/probe.py --quick                                             # one payload per pickle

The CLI cases run the real command in child processes: hostile pickles (a shell command, ``exec`` and ``open``,
in zip and legacy torch files) in every file a loader unpickles, through ``info`` and ``generate``; corrupt,
truncated and sparse safetensors; a sharded index naming files outside its folder; absurd model configs; prompts
that are not UTF-8; bad devices; a full disk (a file-size limit, and a full tmpfs where the probe may mount one);
SIGTERM while the output is written and while sampling; init pictures that declare a 16000x16000 canvas, and an
init video shorter than the frames asked for. The server cases run against ``cinematic serve`` on a free localhost
port (see ``_probe_server.py``). Each must end in exit 2 and one line (or a 4xx naming the field), with no
traceback, no code run (the payloads would create a marker file), no file left behind and no job lost.

It prints a table (case, expected, got, ok) and a summary line, and writes every case to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _common import machine, markdown_table
from _probe_base import CHILD_ENV, ROOT, Probe

# This checkout, not an installed cinematic: for the fixtures made here and for every child (the server helper
# passes os.environ on).
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]
os.environ["PYTHONPATH"] = CHILD_ENV["PYTHONPATH"]


def summary(probe: Probe, log_tracebacks: int, seconds: float) -> dict:
    ran = [c for c in probe.cases if not c.not_run]
    rss = [c.measured["rss_growth_mb"] for c in ran if "rss_growth_mb" in c.measured]
    lost = [c.measured.get("jobs_lost", 0) for c in ran]
    return {
        "cases": len(probe.cases),
        "ok": sum(c.ok for c in ran),
        "failed": [f"{c.group}: {c.name}" for c in ran if not c.ok],
        "not_run": [f"{c.group}: {c.name} ({c.not_run})" for c in probe.cases if c.not_run],
        "tracebacks": sum(c.traceback for c in ran) + log_tracebacks,
        "code_executions": sum(c.executed for c in ran),
        "files_left_behind": sum(len(c.left_behind) for c in ran),
        "jobs_lost": sum(lost),
        "upload_bomb_server_rss_growth_mb": max(rss) if rss else None,
        "seconds": round(seconds, 1),
    }


def summary_line(s: dict) -> str:
    return (
        f"probe: {s['ok']}/{s['cases'] - len(s['not_run'])} cases ok, {len(s['not_run'])} not run; "
        f"{s['tracebacks']} tracebacks, {s['code_executions']} code executions, "
        f"{s['files_left_behind']} files left behind, {s['jobs_lost']} jobs lost; "
        f"the 16000x16000 upload bombs cost the server {s['upload_bomb_server_rss_growth_mb']} MB "
        f"({s['seconds'] / 60:.1f} min)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write every case and the summary here")
    parser.add_argument("--quick", action="store_true", help="one hostile payload per pickle instead of three")
    parser.add_argument("--only", choices=["cli", "server"], help="run one half")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (printed)")
    parser.add_argument("--jobs", type=int, default=3, help="CLI cases run side by side (default 3)")
    args = parser.parse_args()

    import _probe_cli
    import _probe_server

    work = Path(tempfile.mkdtemp(prefix="cinematic-probe-"))
    probe = Probe(work, quick=args.quick, jobs=args.jobs)
    start = time.monotonic()
    logs: list[Path] = []
    try:
        # The two halves side by side: the server's cases mostly wait on its one worker.
        halves = ThreadPoolExecutor(1)
        server = halves.submit(_probe_server.run_all, probe) if args.only in (None, "server") else None
        if args.only in (None, "cli"):
            _probe_cli.run_all(probe)
        logs = server.result() if server else []
        tracebacks = _probe_server.log_tracebacks(logs)
    finally:
        if args.keep:
            print(f"work folder: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    result = summary(probe, tracebacks, time.monotonic() - start)
    rows = [(f"{c.group}: {c.name}", c.expected, c.got, "n/a" if c.not_run else "yes" if c.ok else "NO")
            for c in probe.cases]  # fmt: skip
    print(markdown_table(["case", "expected", "got", "ok"], rows))
    print()
    print(summary_line(result))
    if args.json:
        payload = {"summary": result, "summary_line": summary_line(result), "machine": machine(),
                   "cases": [c.as_json() for c in probe.cases]}  # fmt: skip
        args.json.write_text(json.dumps(payload, indent=1) + "\n")
    return 0 if not result["failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
