"""Start-up time of every `stn` command that does not train: median wall time against the 2 s target.

    python experiments/bench/startup.py [--runs 5] [--python PYTHON]      (from the checkout's root)

Each command runs as a fresh process (`python -m stn ...`, what the `stn` script does) with a new, empty
stn cache (STN_CACHE_DIR in a temporary folder): the first run of each is reported as "cold" (what a first
call after installing or editing stn costs: the cache is filled), then --runs more give the median "warm"
time, the figure the target is about. Prints the CPU, its core count and the load average before and after,
since a busy machine slows every figure. Commands that write (a dry run writes nothing) run in a temporary
folder where they would.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TARGET_S = 2.0
COMMANDS = [
    "--help",
    "--version",
    "train --help",
    "train --cfg job dataset=RTS model=st_cnn transformer=tps",
    "train -m dataset=R,RTS model=cnn,fcn --cfg job",
    "train -m model=st_cnn transformer=affine,projective,tps seed=0,1 --cfg job",
    "models",
    "data --help",
    "data card --help",
    "data preview --help",
    "reproduce-table --help",
    "reproduce-table --dry-run --preset quick",
    "convergence run --dry-run",
    "convergence plot --help",
    "bench --help",
    "engine plan --help",
    "engine plan --preset paper",
    "visualize --help",
    "recovery --help",
]


def cpu_model() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown CPU"


def timed(python: str, command: str, env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run([python, "-m", "stn", *command.split()], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"`stn {command}` exited {done.returncode}:\n{done.stderr[-2000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="warm runs per command (after one cold run)")
    parser.add_argument("--python", default=sys.executable, help="the Python with stn installed")
    args = parser.parse_args()
    load_before = os.getloadavg()
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; load average (1/5/15 min) before: "
          f"{' / '.join(f'{x:.2f}' for x in load_before)}")
    print(f"stn from {ROOT / 'src'}; python {platform.python_version()}; {args.runs} warm runs per command\n")
    print(f"| command | cold (first run, empty cache) s | warm median s | warm min-max s | under {TARGET_S:g} s |")
    print("|---|---|---|---|---|")
    failures = 0
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "STN_CACHE_DIR": cache, "PYTHONPATH": str(ROOT / "src"),
               "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
        for command in COMMANDS:
            cold = timed(args.python, command, env)
            warm = [timed(args.python, command, env) for _ in range(args.runs)]
            median = statistics.median(warm)
            ok = median < TARGET_S
            failures += not ok
            print(f"| `stn {command}` | {cold:.2f} | {median:.2f} | {min(warm):.2f}-{max(warm):.2f} | "
                  f"{'yes' if ok else '**no**'} |", flush=True)
    load_after = os.getloadavg()
    print(f"\nload average after: {' / '.join(f'{x:.2f}' for x in load_after)}; "
          f"{len(COMMANDS) - failures} of {len(COMMANDS)} commands under {TARGET_S:g} s (warm median)")


if __name__ == "__main__":
    main()
