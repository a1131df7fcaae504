"""tools/torch_index.py: which torch build `make setup` installs (the decision, with fake probes)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "torch_index.py"
spec = importlib.util.spec_from_file_location("torch_index", SCRIPT)
torch_index = importlib.util.module_from_spec(spec)
spec.loader.exec_module(torch_index)
CPU = ["--index-url", "https://download.pytorch.org/whl/cpu"]


def never(*_: object) -> bool:
    raise AssertionError("must not be probed")


@pytest.mark.parametrize(("system", "gpu", "index_up", "args", "says"), [
    ("Linux", False, True, CPU, "CPU build from https://download.pytorch.org/whl/cpu"),
    ("Linux", False, False, [], "not reachable: installing the default build"),
    ("Linux", True, True, [], "default (CUDA) build, an NVIDIA GPU is present"),
    ("Darwin", False, True, [], "default build (Darwin"),
    ("Windows", False, True, [], "default build (Windows"),
])
def test_auto_takes_the_cpu_build_only_on_linux_without_a_gpu_when_the_index_answers(
        system: str, gpu: bool, index_up: bool, args: list[str], says: str) -> None:
    probed: list[str] = []

    def probe(url: str) -> bool:
        probed.append(url)
        return index_up

    got, line = torch_index.choose("auto", system=system, gpu=lambda: gpu, probe=probe)
    assert got == args and says in line and "\n" not in line
    assert probed == (["https://download.pytorch.org/whl/cpu"] if system == "Linux" and not gpu else [])


def test_explicit_modes_never_probe() -> None:
    assert torch_index.choose("default", system="Linux", gpu=never, probe=never)[0] == []
    url = "https://download.pytorch.org/whl/cu128"
    assert torch_index.choose(url, system="Linux", gpu=never, probe=never)[0] == ["--index-url", url]


def test_gpu_detection_from_nvidia_smi_or_device_files() -> None:
    assert torch_index.has_gpu(which=lambda name: "/usr/bin/nvidia-smi", devices=lambda pattern: [])
    assert torch_index.has_gpu(which=lambda name: None, devices=lambda pattern: ["/dev/nvidia0"])
    assert not torch_index.has_gpu(which=lambda name: None, devices=lambda pattern: [])


def test_reachable_asks_the_index_over_http(tmp_path: Path) -> None:
    (tmp_path / "whl" / "torch").mkdir(parents=True)
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(SimpleHTTPRequestHandler, directory=str(tmp_path)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        assert torch_index.reachable(f"{base}/whl")
        assert not torch_index.reachable(f"{base}/missing")  # 404
    finally:
        server.shutdown()
    assert not torch_index.reachable(f"http://127.0.0.1:{server.server_address[1]}/whl", timeout_s=2)  # closed
    assert not torch_index.reachable("not a url")


@pytest.mark.subprocess
def test_script_prints_pip_arguments_on_stdout_and_one_line_on_stderr() -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "https://example.invalid/whl"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0
    assert done.stdout == "--index-url https://example.invalid/whl\n"
    assert done.stderr == "torch: from https://example.invalid/whl (TORCH_INDEX)\n"
