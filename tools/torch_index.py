"""Which PyTorch build `make setup` installs: prints pip's index arguments for the torch line (stdlib only).

    python3 tools/torch_index.py [auto|default|<index URL>]     (the Makefile's TORCH_INDEX, default auto)

auto: on Linux with no NVIDIA GPU (no `nvidia-smi` on PATH and no /dev/nvidia*), PyPI's torch wheel bundles
~5 GB of CUDA libraries the machine cannot use, so the CPU build is taken from PyTorch's CPU wheel index
(https://download.pytorch.org/whl/cpu), as PyTorch's install page says, if that index answers within a few
seconds; if it does not, the default build is installed and one line on stderr says so. With a GPU, or on
macOS and Windows (whose PyPI wheels hold no CUDA), nothing is added. default: never add an index. A URL:
always that index. stdout holds the pip arguments (possibly none); stderr one line saying what was chosen.
"""

from __future__ import annotations

import glob
import platform
import shutil
import sys
import urllib.request
from collections.abc import Callable

CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def has_gpu(which: Callable[[str], str | None] = shutil.which,
            devices: Callable[[str], list[str]] = glob.glob) -> bool:
    """An NVIDIA GPU (its driver's nvidia-smi, or its device files) is present."""
    return which("nvidia-smi") is not None or bool(devices("/dev/nvidia*"))


def reachable(url: str, timeout_s: float = 5.0) -> bool:
    """The index answers an HTTP request (any status below 400) within timeout_s."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url + "/torch/", method="HEAD"), timeout=timeout_s) as r:
            return r.status < 400
    except (OSError, ValueError):  # DNS, refused, timed out, HTTP errors, a malformed URL
        return False


def choose(mode: str = "auto", *, system: str | None = None, gpu: Callable[[], bool] = has_gpu,
           probe: Callable[[str], bool] = reachable) -> tuple[list[str], str]:
    """(pip arguments for the torch line, the line to print) for TORCH_INDEX=mode."""
    system = system or platform.system()
    if mode == "default":
        return [], "torch: default build (TORCH_INDEX=default)"
    if mode != "auto":
        return ["--index-url", mode], f"torch: from {mode} (TORCH_INDEX)"
    if system != "Linux":
        return [], f"torch: default build ({system}: PyPI's wheels are CPU/MPS builds already)"
    if gpu():
        return [], "torch: default (CUDA) build, an NVIDIA GPU is present"
    if probe(CPU_INDEX):
        return ["--index-url", CPU_INDEX], f"torch: CPU build from {CPU_INDEX} (no GPU here)"
    return [], (f"torch: no GPU here, but PyTorch's CPU wheel index ({CPU_INDEX}) is not reachable: installing "
                f"the default build (on PyPI it bundles CUDA libraries, ~5 GB)")


def main(argv: list[str]) -> int:
    args, line = choose(argv[1] if len(argv) > 1 and argv[1] else "auto")
    print(line, file=sys.stderr)
    print(" ".join(args))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
