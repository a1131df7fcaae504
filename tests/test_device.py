"""stn.device: the memory estimate against measured peak memory, and the refusal of a run that would not fit.
Also: device strings, the precision a run uses, and keep_freed_memory's effect on glibc's allocator."""

from __future__ import annotations

import dataclasses
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import stn.device as device_module
from stn.cli.main import app
from stn.compose import compose
from stn.config import ConfigError
from stn.device import resolve_device, resolve_precision
from stn.models import build_model

PEAK = """
import sys, torch, torch.nn.functional as F
from stn.compose import compose
from stn.device import saved_bytes_per_image
from stn.models import build_model
cfg = compose(sys.argv[2:]); batch = int(sys.argv[1]); side = cfg.dataset.size
torch.manual_seed(0)
model = build_model(cfg).to(memory_format=torch.channels_last)
optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
def step(b):
    images = torch.rand(b, 1, side, side).contiguous(memory_format=torch.channels_last)
    loss = F.cross_entropy(model(images), torch.randint(0, 10, (b,)))
    optimizer.zero_grad(); loss.backward(); optimizer.step()
step(2); step(2)  # kernels loaded, optimizer state allocated
per_image = saved_bytes_per_image(model, side, torch.device("cpu"))
def status(key):  # kB -> bytes
    return int(next(l for l in open('/proc/self/status') if l.startswith(key + ':')).split()[1]) * 1024
open('/proc/self/clear_refs', 'w').write('5')  # VmHWM := VmRSS (ru_maxrss would carry the parent's peak over exec)
before = status('VmRSS')
step(batch)
print(per_image, status('VmHWM') - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak resident memory from /proc: Linux")
@pytest.mark.parametrize("overrides", [("dataset=R", "model=cnn"), ("dataset=RTS", "model=st_cnn", "transformer=affine"),
                                       ("dataset=TC", "model=st_cnn", "transformer=affine")],
                         ids=["R-cnn", "RTS-st_cnn", "TC-st_cnn"])
@pytest.mark.subprocess
def test_the_estimate_covers_the_measured_peak_of_a_training_step(overrides):
    """One step at batch 1024 in a fresh process: the peak resident memory it adds (measured 0.2-0.6 GiB here)
    lies under the estimate (2x autograd's saved bytes + the batch), and the estimate is not more than twice it."""
    batch = 1024
    out = subprocess.run([sys.executable, "-c", PEAK, str(batch), *overrides], capture_output=True, text=True,
                         check=True)
    per_image, measured = map(float, out.stdout.split())
    side = compose(list(overrides)).dataset.size
    estimate = device_module.training_bytes(per_image, 0, batch, 0, side, 0, False) - 10_000 * side * side * 4
    assert measured <= estimate <= 2 * measured, (per_image, measured, estimate)


def test_a_run_that_would_not_fit_is_refused_with_the_estimate(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device_module, "available_bytes", lambda device: 1 << 30)  # a 1 GiB machine
    cpu = torch.device("cpu")
    big = compose(["dataset=TC", "model=st_cnn", "transformer=affine", "trainer.batch_size=8192"])
    with pytest.raises(ConfigError, match=r"trainer.batch_size=8192: this run needs about \d+\.\d GiB") as err:
        device_module.check_memory(build_model(big), big, cpu)
    fits = int(str(err.value).split("about ")[2].split(" fits")[0])
    assert 0 < fits < 8192
    smaller = compose(["dataset=TC", "model=st_cnn", "transformer=affine", f"trainer.batch_size={fits}"])
    device_module.check_memory(build_model(smaller), smaller, cpu)  # the suggested batch does fit
    paper = compose(["dataset=TC", "model=st_cnn", "transformer=affine"])
    device_module.check_memory(build_model(paper), paper, cpu)


def test_the_cli_refuses_it_before_loading_mnist(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setattr(device_module, "available_bytes", lambda device: 1 << 30)
    result = CliRunner().invoke(app, ["train", "dataset=TC", "model=st_cnn", "transformer=affine",
                                      "trainer.batch_size=8192", "trainer.device=cpu", "logger.mode=disabled",
                                      f"data_dir={tmp_path / 'no-mnist-here'}", f"runs_dir={tmp_path / 'runs'}"])
    assert result.exit_code == 2 and "GiB" in result.stderr and "MNIST" not in result.stderr
    assert not (tmp_path / "runs").exists()


KEPT_MEMORY = """
import sys, torch
from stn.device import keep_freed_memory
def rss(): return int(open('/proc/self/statm').read().split()[1]) * 4096
if sys.argv[1] == 'keep':
    assert keep_freed_memory()
base = rss(); block = torch.ones(16 << 20); peak = rss(); del block; after = rss()
print(peak - base, after - base)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="keep_freed_memory tunes glibc's malloc only")
@pytest.mark.subprocess
def test_keep_freed_memory_keeps_a_freed_block_resident():
    """A 64 MiB tensor: glibc serves it with mmap and returns it to the kernel on free (resident memory falls
    back), unless keep_freed_memory made the heap serve and keep it. Fresh processes: the setting is global."""
    held = {}
    for mode in ("default", "keep"):
        out = subprocess.run([sys.executable, "-c", KEPT_MEMORY, mode], capture_output=True, text=True, check=True)
        grown, kept = map(int, out.stdout.split())
        assert grown >= 60 << 20  # the block was touched: 64 MiB resident
        held[mode] = kept / grown
    assert held["default"] < 0.1 and held["keep"] > 0.9, held


def test_resolve_device() -> None:
    """Every accepted trainer.device string maps to its torch.device; a CUDA device that is not there is a
    ConfigError naming the key and what to use instead (exit code 2 through the CLI, before any folder exists)."""
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    missing = ["cuda:99"] + ([] if torch.cuda.is_available() else ["cuda", "cuda:0"])
    for name in missing:
        with pytest.raises(ConfigError, match=f"trainer.device={name} but .*(auto|cuda:0)") as err:
            resolve_device(name)
        assert "cpu" in str(err.value)


def test_precision_follows_the_device_and_the_cpu_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    cfg = compose(["trainer=smoke"])
    base, cnn = cfg.trainer, cfg.model
    assert base.amp and base.cpu_precision == "float32" and cnn.name == "cnn"
    # trainer.amp is CUDA's switch only; the CPU follows trainer.cpu_precision.
    assert resolve_precision(base, cpu, cnn) == "float32" and resolve_precision(base, cuda, cnn) == "bf16"
    assert resolve_precision(dataclasses.replace(base, amp=False), cuda, cnn) == "float32"
    assert resolve_precision(dataclasses.replace(base, cpu_precision="bf16"), cpu, cnn) == "bf16"
    auto = dataclasses.replace(base, cpu_precision="auto")
    for hardware, expected in ((True, "bf16"), (False, "float32")):
        monkeypatch.setattr(device_module, "cpu_has_bf16", lambda hardware=hardware: hardware)
        assert resolve_precision(auto, cpu, cnn) == expected
        assert device_module.runtime_flags(auto, cpu, cnn) == (expected == "bf16", base.channels_last)
    with pytest.raises(ConfigError, match="trainer.cpu_precision='fp16' is not one of"):
        compose(["trainer.cpu_precision=fp16"])


@pytest.mark.parametrize(("overrides", "with_amx", "without_amx"), [
    (["model=fcn"], "float32", "float32"), (["model=st_fcn", "transformer=affine"], "float32", "float32"),
    (["model=cnn"], "bf16", "bf16"), (["model=st_cnn", "transformer=affine"], "bf16", "float32"),
    (["model=st_cnn", "transformer=tps"], "bf16", "float32"),
])
def test_auto_takes_bf16_only_for_the_models_it_speeds_up(monkeypatch: pytest.MonkeyPatch, overrides, with_amx,
                                                          without_amx) -> None:
    # bf16 autocast slowed the FCN-family steps everywhere (0.86-1.06x) and sped up the CNN; the ST-CNNs gained
    # with AMX (1.31-1.49x) and lost with AVX512-BF16 alone (0.82-0.91x on a Zen 4)
    monkeypatch.setattr(device_module, "cpu_has_bf16", lambda: True)
    cfg = compose(["trainer=smoke", "trainer.cpu_precision=auto", *overrides])
    for amx, expected in ((True, with_amx), (False, without_amx)):
        monkeypatch.setattr(device_module, "cpu_has_amx", lambda amx=amx: amx)
        assert resolve_precision(cfg.trainer, torch.device("cpu"), cfg.model) == expected
        # an explicit setting is obeyed whatever the model and the hardware
        assert resolve_precision(dataclasses.replace(cfg.trainer, cpu_precision="bf16"), torch.device("cpu"),
                                 cfg.model) == "bf16"
    # no bf16 hardware: float32 for every model, AMX or not
    monkeypatch.setattr(device_module, "cpu_has_bf16", lambda: False)
    assert resolve_precision(cfg.trainer, torch.device("cpu"), cfg.model) == "float32"


@pytest.mark.subprocess
def test_code_commit_is_stns_own_whatever_the_working_directory(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run records the commit of the stn checkout it imported, not of the repository it was started from, and
    nothing for an stn that is not its own checkout (an install inside another repository)."""

    def git(where, *args: str) -> str:
        return subprocess.run(["git", "-C", str(where), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                              capture_output=True, text=True, check=True).stdout.strip()

    def commit_of(module_file: Path) -> str:
        monkeypatch.setattr(device_module, "__file__", str(module_file))
        device_module.code_commit.cache_clear()
        try:
            return device_module.code_commit()
        finally:
            device_module.code_commit.cache_clear()

    checkout = tmp_path / "stn"  # a stand-in for stn's checkout: <root>/src/stn/device.py
    (checkout / "src" / "stn").mkdir(parents=True)
    (checkout / "src" / "stn" / "device.py").write_text("")
    git(checkout, "init", "-q")
    git(checkout, "add", ".")
    git(checkout, "commit", "-q", "-m", "stn")
    other = tmp_path / "other"
    other.mkdir()
    git(other, "init", "-q")
    git(other, "commit", "-q", "--allow-empty", "-m", "another project")
    monkeypatch.chdir(other)
    own = git(checkout, "rev-parse", "--short", "HEAD")
    assert commit_of(checkout / "src" / "stn" / "device.py") == own != git(other, "rev-parse", "--short", "HEAD")
    (checkout / "src" / "stn" / "device.py").write_text("# edited\n")
    assert commit_of(checkout / "src" / "stn" / "device.py") == own + "+dirty"
    nested = other / "venv" / "site" / "stn"  # stn installed inside another repository: not stn's history
    nested.mkdir(parents=True)
    assert commit_of(nested / "device.py") == ""
