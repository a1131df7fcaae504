"""The partly trained groups' states of a table run: how big they are, how they pack into the few files a GPU
run may return, and reading and writing those files (`partial.pt`, `partial-2.pt`, ...: the in-flight groups'
weights, momentum, loss windows and data positions), checked against the plan they resume into.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stn.checkpoints import save_checkpoint
from stn.engine.options import shape_signature
from stn.engine.plan import Group, PlanError

PARTIAL = "partial.pt"
PARTIAL_VERSION = 2  # partial files holding several groups each (1: one group per partial.pt)


@dataclass(frozen=True)
class StateLimits:
    """What the partly trained groups' states may take when a run's files come back from the GPU machine.

    The device tool returns at most 8 files of at most 16 MiB each, 64 MiB in all. A loan's other files (log,
    tests, bench, results.json/.csv, progress.json: 6 in run_gpu.sh's `loan`) leave `files` = 2 for the
    states and a few MiB of the total; the groups in flight are capped so that their states pack into these
    files (`pack_states`). One 28x28 group of 9 models is ~14.3 MiB (parameters and momentum, float32): a
    file holds one of those, or three of the 42 px CNN groups of 3 (~5.3 MiB each), or two of the 42 px
    FCN groups (~5.6 MiB) or 60 px groups (6.1-11 MiB)."""

    files: int = 2
    file_bytes: int = 16 * 2**20
    total_bytes: int = 60 * 2**20


# parameters and buffers per model, by shape signature (counting builds a model on the meta device)
_COUNTS: dict[str, tuple[int, int]] = {}

# the pickled structure, parameter names, stream states and bad-step/loss vectors of one group, and the zip
# container's per-record headers: measured 5.7 KB (CNN RTS, K = 3), 6.2 KB (CNN R-P-E, K = 9), 10.6 KB (ST-CNN
# TPS R-P-E, K = 9), either data stream; tests/test_plan.py checks the bound against real files
STATE_OVERHEAD_BYTES = 32 * 2**10


def state_bytes(group: Group, dtype: torch.dtype = torch.float32) -> int:
    """An upper bound on the bytes of `group`'s saved state: K x (parameters + momentum + buffers) at `dtype`,
    plus `STATE_OVERHEAD_BYTES`. Counted on the meta device (no memory, no initialisation)."""
    cfg = group.members[0].config
    key = shape_signature(cfg)
    if key not in _COUNTS:
        from stn.models import build_model

        with torch.device("meta"):
            model = build_model(cfg, fast=False)
        _COUNTS[key] = (sum(p.numel() for p in model.parameters()), sum(b.numel() for b in model.buffers()))
    parameters, buffers = _COUNTS[key]
    width = torch.empty((), dtype=dtype).element_size()
    return group.k * (2 * parameters + buffers) * width + STATE_OVERHEAD_BYTES


def pack_states(sizes: dict[str, int], limits: StateLimits) -> list[list[str]] | None:
    """The states (bytes per group id) packed into at most `limits.files` files of at most `limits.file_bytes`
    each, first fit by decreasing size; None if they do not fit (or their total exceeds `limits.total_bytes`)."""
    if sum(sizes.values()) > limits.total_bytes:
        return None
    files: list[list[str]] = []
    room: list[int] = []
    for gid in sorted(sizes, key=lambda g: (-sizes[g], g)):
        where = next((i for i, left in enumerate(room) if sizes[gid] <= left), None)
        if where is None:
            if len(files) == limits.files or sizes[gid] > limits.file_bytes:
                return None
            files.append([])
            room.append(limits.file_bytes)
            where = len(files) - 1
        files[where].append(gid)
        room[where] -= sizes[gid]
    return files


def next_to_start(pending: Sequence[Group], flying: Sequence[str], sizes: dict[str, int], limits: StateLimits,
                  in_flight: int) -> Group | None:
    """The first group of `pending` (in run order) whose state packs beside those of the groups in flight, if
    fewer than `in_flight` fly; None if none can start now. A group whose state alone exceeds the limits starts
    only when nothing else is in flight (its state is then written on its own, with a warning)."""
    if len(flying) >= in_flight:
        return None
    for group in pending:
        if not flying or pack_states({gid: sizes[gid] for gid in flying} | {group.gid: sizes[group.gid]},
                                     limits) is not None:
            return group
    return None


def partial_name(index: int) -> str:
    """partial.pt, partial-2.pt, partial-3.pt, ...: the first keeps the name one-group states always had."""
    return PARTIAL if index == 0 else PARTIAL.replace(".pt", f"-{index + 1}.pt")


def partial_files(state_dir: Path) -> list[Path]:
    return sorted(state_dir.glob(PARTIAL.replace(".pt", "*.pt")))


def load_partials(state_dir: Path) -> dict[str, dict[str, Any]]:
    """Every partly trained group's entry, by group id, from the partial files (also the one-group files of
    2026-11-30: {"gid", "state"})."""
    entries: dict[str, dict[str, Any]] = {}
    for path in partial_files(state_dir):
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unreadable file means the same thing
            raise PlanError(f"{path} is unreadable ({type(err).__name__}); delete it to retrain its groups") from None
        for entry in data["groups"] if "groups" in data else [data]:
            if entry["gid"] in entries:
                raise PlanError(f"group {entry['gid']!r} is in two partial files ({path.name} and another): keep "
                                f"the newer and delete the other")
            entries[entry["gid"]] = {**entry, "file": path.name}
    return entries


def load_partial(state_dir: Path) -> dict[str, Any] | None:
    """The first partly trained group's entry, or None (the one-group view older callers read)."""
    entries = load_partials(state_dir)
    return next(iter(entries.values()), None)


def save_partials(state_dir: Path, entries: dict[str, dict[str, Any]], limits: StateLimits,
                  log: Callable[[str], None] = print) -> list[Path]:
    """Write the entries packed into partial files (`pack_states` on their estimated sizes), then remove any
    older partial file not rewritten; returns the files written. A state too large for the limits is still
    written (one file per group) with a warning: losing it would lose its training."""
    sizes = {gid: int(entry["bytes"]) for gid, entry in entries.items()}
    packing = pack_states(sizes, limits)
    if packing is None:
        log(f"warning: the partial states ({sum(sizes.values()) / 2**20:.1f} MiB) do not fit {limits}: "
            f"one file per group")
        packing = [[gid] for gid in sorted(sizes)]
    written = []
    for index, gids in enumerate(packing):
        path = state_dir / partial_name(index)
        payload = {"version": PARTIAL_VERSION,
                   "groups": [{k: v for k, v in entries[gid].items() if k != "file"} for gid in gids]}
        save_checkpoint(path, payload)
        written.append(path)
    for path in partial_files(state_dir):
        if path not in written:
            path.unlink()
    return written


def data_of(entry: dict[str, Any]) -> dict[str, Any]:
    """The data streams an entry was trained with (recorded since the concurrent engine; older entries: read
    from their stream state, a list for the exact streams, a dict with block_steps for block streams)."""
    if "data" in entry:
        return dict(entry["data"])
    streams = entry["state"]["streams"]
    if isinstance(streams, dict):
        return {"mode": "block", "block_steps": int(streams["block_steps"])}
    return {"mode": "exact", "block_steps": None}


def check_partials(partials: dict[str, dict[str, Any]], groups: Sequence[Group], state_dir: Path) -> None:
    by_gid = {g.gid: g for g in groups}
    for gid, entry in partials.items():
        where = state_dir / entry["file"]
        if gid not in by_gid:
            raise PlanError(f"{where} holds group {gid!r}, which this plan does not have; "
                            f"run it with the plan it was made with, or delete it")
        mine = [m.key for m in by_gid[gid].members]
        if "members" in entry and list(entry["members"]) != mine:
            raise PlanError(f"{where}: group {gid!r} was trained (and its data blocks drawn) by {entry['members']}, "
                            f"this plan's group {gid!r} has {mine}: resume with the --seeds/--max-k/--rows/--columns "
                            f"it was started with, or delete {entry['file']} to retrain that group")
