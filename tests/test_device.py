"""stn.device: the memory estimate against measured peak memory, and the refusal of a run that would not fit.
(Device strings and precision: test_train.py; keep_freed_memory: test_bench.py.)"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

import stn.device as device_module
from stn.cli import app
from stn.compose import compose
from stn.config import ConfigError
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
