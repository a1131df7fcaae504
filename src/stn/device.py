"""Where and in what arithmetic a run computes: the device, the precision, the CPU allocator.

`resolve_device` turns trainer.device into a torch.device (a missing CUDA device is a ConfigError);
`resolve_precision` / `runtime_flags` decide bf16 autocast (CUDA: trainer.amp; CPU: trainer.cpu_precision)
and channels_last; `keep_freed_memory` tunes glibc's allocator for the CPU training loop; `check_memory`
refuses a run whose estimated peak memory exceeds what the machine has free. `sync` waits for the device
(timing, reading losses); `cpu_model` names the CPU for records and benchmark reports.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from stn.config import ConfigError, ModelConfig, TrainerConfig


def resolve_device(name: str) -> torch.device:
    """trainer.device -> torch.device: 'auto' is CUDA when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device={name} but no CUDA device is available: use trainer.device=auto or cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"trainer.device={name} but only {torch.cuda.device_count()} CUDA device(s) exist: "
                          f"use cuda:0 .. cuda:{max(torch.cuda.device_count() - 1, 0)}, auto or cpu")
    return device


def sync(device: torch.device) -> None:
    """Wait until `device` has finished its queued work (CUDA; the CPU computes synchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what `platform` knows about the machine."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.platform()


def machine_name(device: torch.device | str = "cpu") -> str:
    """What ran the arithmetic: for the CPU its model, vector ISA as torch dispatches on it and core count, e.g.
    'AMD EPYC (AVX2, 2 cores)' (float results differ between ISAs, so a record names it); else the GPU's name."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} cores)"


@functools.cache
def code_commit() -> str:
    """The commit of the stn checkout this process imported, '+dirty' when its src/ or conf/ differ from it; ''
    when stn is not installed from a git checkout. Asked once per process (the code it runs), and of stn's own
    folder, not of the working directory, which may be another repository."""
    root = Path(__file__).resolve().parents[2]
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=5,
                                  check=True).stdout

        if Path(git("rev-parse", "--show-toplevel").strip()).resolve() != root:
            return ""  # stn sits inside some other repository (e.g. a virtualenv in one): not stn's history
        commit = git("rev-parse", "--short", "HEAD").strip()
        return commit + ("+dirty" if git("status", "--porcelain", "--", "src", "conf").strip() else "")
    except (OSError, subprocess.SubprocessError):
        return ""


CPUINFO = Path("/proc/cpuinfo")  # where Linux lists the CPU's feature flags (a test points it at a fake CPU)


@functools.cache
def _flags(path: str) -> frozenset[str] | None:
    try:
        with open(path) as handle:
            for line in handle:
                if line.startswith("flags"):  # x86: "flags : fpu ... avx512f avx512_bf16 amx_bf16 amx_tile ..."
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def cpu_flags() -> frozenset[str] | None:
    """The x86 CPU's feature flags as the kernel reports them (/proc/cpuinfo), read once; None where there is no
    such list (another OS or architecture)."""
    return _flags(str(CPUINFO))


def _torch_cpuinfo(query: str) -> bool:
    """torch's own reading of the CPUID bits (cpuinfo), where /proc/cpuinfo is not there."""
    try:
        return bool(getattr(torch.cpu, query)())
    except (AttributeError, RuntimeError):  # an older torch without the query
        return False


def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic in hardware: the AVX512-BF16 or AMX-BF16 flag, read from
    /proc/cpuinfo (else torch's CPUID reading), never measured.

    Not oneDNN's "bf16 supported", which it says of any AVX-512 CPU, emulating bf16 where the hardware lacks it:
    on an Intel Xeon with AVX-512 but neither flag a bf16 matmul ran at 61 GFLOP/s against 326 in float32, and
    bf16 training at 0.39-0.64x of float32; on a 2-core AMD EPYC exposing AVX2 only, 0.9 GFLOP/s against 133
    (experiments/bench/precision.md).
    """
    flags = cpu_flags()
    if flags is not None:
        return bool(flags & {"avx512_bf16", "amx_bf16"})
    return _torch_cpuinfo("_is_avx512_bf16_supported") or _torch_cpuinfo("_is_amx_tile_supported")


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles with bf16 (Intel Sapphire Rapids and later), the matrix unit oneDNN's bf16
    convolutions are fastest on; AMD Zen 4 has AVX512-BF16 but no AMX. Read as `cpu_has_bf16` reads its flags."""
    flags = cpu_flags()
    if flags is not None:
        return {"amx_bf16", "amx_tile"} <= flags
    return _torch_cpuinfo("_is_amx_tile_supported")


# Models whose training step bf16 autocast speeds up, by the CPU's bf16 hardware; measured side by side with
# `stn bench` on 2-core VMs (experiments/bench/precision.md). With AMX (Intel Xeon): CNN 1.41x on R and 2.70x on
# TC, ST-CNN Aff / Proj / TPS 1.31-1.49x; FCN and ST-FCNs 0.86-1.06x. With AVX512-BF16 alone (AMD EPYC Zen 4):
# CNN 1.29-1.32x on R and 1.86x on TC, but the ST-CNNs 0.82-0.91x on R (TC ST-CNN Aff 1.03x); FCN 0.92-0.93x on R.
BF16_PAYS_WITH_AMX = ("cnn", "st_cnn")
BF16_PAYS_WITHOUT_AMX = ("cnn",)


def resolve_precision(trainer: TrainerConfig, device: torch.device, model: ModelConfig) -> str:
    """The arithmetic a run uses on `device`: 'bf16' (autocast) or 'float32'.

    CUDA: trainer.amp. CPU: trainer.cpu_precision, where 'auto' is bf16 only on CPUs with bf16 hardware and
    only for the models it speeds up there (`BF16_PAYS_WITH_AMX` or `BF16_PAYS_WITHOUT_AMX`).
    """
    if device.type == "cuda":
        return "bf16" if trainer.amp else "float32"
    if trainer.cpu_precision == "auto":
        if not cpu_has_bf16():
            return "float32"
        pays = BF16_PAYS_WITH_AMX if cpu_has_amx() else BF16_PAYS_WITHOUT_AMX
        return "bf16" if model.name in pays else "float32"
    return trainer.cpu_precision


def runtime_flags(trainer: TrainerConfig, device: torch.device, model: ModelConfig) -> tuple[bool, bool]:
    """(amp, channels_last) as they apply on `device`: bf16 autocast per `resolve_precision`, channels_last anywhere."""
    return resolve_precision(trainer, device, model) == "bf16", trainer.channels_last


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory in the process instead of returning it to the kernel; False if not glibc.

    By default glibc serves big blocks with mmap and unmaps them on free (and trims the heap top), so the
    same activations of every training step are page-faulted in afresh: on the 2-core CPU that was over a
    quarter of a CNN step on RTS (266 -> 193 ms at batch 256, kernel time 5.0 -> 0.6 s) and a sixth on R
    (experiments/bench/train.md). M_MMAP_MAX=0 serves every block from the heap, M_TRIM_THRESHOLD=1 GiB
    keeps its free top. Process-wide, never undone.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another C library: leave its allocator alone
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    return bool(mallopt(m_trim_threshold, 1 << 30)) and bool(mallopt(m_mmap_max, 0))


# ------------------------------------------------------------------------------------------------ memory

GIB = 1 << 30


def saved_bytes_per_image(model: torch.nn.Module, side: int, device: torch.device) -> float:
    """Bytes autograd keeps per image for the backward pass (float32), from two tiny batches: their difference
    is the per-image part alone (the weights autograd also saves cancel out). Zeros as input and no global RNG,
    so a run's random streams are untouched."""

    def saved(batch: int) -> int:
        storages: dict[int, int] = {}

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor

        images = torch.zeros(batch, 1, side, side, device=device)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            model(images).sum()
        return sum(storages.values())

    return max(saved(8) - saved(4), 0) / 4


def available_bytes(device: torch.device) -> int | None:
    """Memory free for this run: MemAvailable on a Linux CPU, the free device memory on CUDA; None if unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def training_bytes(per_image: float, parameters: int, batch: int, eval_batch: int, side: int,
                   train_digits: int, fixed_train: bool) -> float:
    """Peak memory of a training run, estimated: the backward's peak is about twice what autograd saves (its
    gradients of the largest activations come on top; measured 1.35-1.7x on the CPU, tests/test_device.py),
    evaluation holds at most the saved-size activations of one eval batch, then the data on the device (digits,
    the fixed test set, a fixed training set) and weights, gradients and momentum."""
    canvas = side * side * 4  # one float32 image
    data = train_digits * 28 * 28 + 10_000 * canvas + (train_digits * canvas if fixed_train else 0)
    return 2 * per_image * batch + 2 * batch * canvas + per_image * eval_batch + data + 4 * 3 * parameters


def check_memory(model: torch.nn.Module, cfg: Any, device: torch.device) -> None:
    """Refuse (ConfigError, exit 2) a run whose estimated peak memory exceeds what this machine has free."""
    free = available_bytes(device)
    if free is None:
        return
    trainer, data = cfg.trainer, cfg.dataset
    per_image = saved_bytes_per_image(model, data.size, device)
    digits = min(data.train_limit or 60_000, 60_000)
    need = training_bytes(per_image, sum(p.numel() for p in model.parameters()), trainer.batch_size,
                          trainer.eval_batch_size, data.size, digits, data.fixed_train)
    if need <= free:
        return
    per_batch_image = 2 * per_image + 2 * data.size * data.size * 4
    fits = int(max(free - (need - per_batch_image * trainer.batch_size), 0) // per_batch_image)
    raise ConfigError(
        f"trainer.batch_size={trainer.batch_size}: this run needs about {need / GIB:.1f} GiB "
        f"({per_batch_image / (1 << 20):.2f} MiB per image of a batch, {cfg.dataset.name} {cfg.model.name}), "
        f"but {device} has {free / GIB:.1f} GiB free; lower trainer.batch_size (about {fits} fits) or "
        f"trainer.eval_batch_size, or free memory"
    )
