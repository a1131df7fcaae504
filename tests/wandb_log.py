"""Test helper, shared: read an offline W&B run back from its own transaction log (run-*.wandb).

The log is LevelDB-style: a 7-byte header (":W&B" + version), then 32 KiB blocks of records (crc32c,
length, type, data); a protobuf `Record` may span blocks (types FIRST/MIDDLE/LAST) and a block's tail too
short for a header is padding. wandb's writer is a separate process (wandb-core) that can still be flushing
after `finish()` returns on a loaded machine, so `read_run` retries until what the test needs is there.
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
HEADER = 7  # crc32c (4) + length (2) + type (1)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> list[wandb_internal_pb2.Record]:
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    records, pending, pos = [], b"", 7
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if kind == 0 and length == 0:  # zero fill: the end of what has been written so far
            break
        chunk = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind == FULL:
            records.append(chunk)
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            records.append(pending + chunk)
    parsed = []
    for raw in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        parsed.append(record)
    return parsed


def parse_run(folder: Path) -> dict[str, Any]:
    """id, tags, group, job_type, name, config, history rows, summary, metric definitions (define_metric:
    name -> {"step_metric", "summary": sorted aggregations}) and logged artifacts ({"name", "type", "aliases"
    (sorted), "files" (sorted paths in the artifact), "staged" (path -> the local copy sync uploads),
    "metadata"}), and "finished" once the exit record is
    there, of the offline run in `folder` (a
    wandb/offline-run-* folder)."""
    (log,) = folder.glob("run-*.wandb")
    run: dict[str, Any] = {"config": {}, "history": [], "summary": {}, "metrics": {}, "artifacts": [],
                           "finished": False, "file": log}
    for record in read_records(log):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.update(tags=list(record.run.tags), group=record.run.run_group, id=record.run.run_id,
                       job_type=record.run.job_type, name=record.run.display_name)
            updates = record.run.config.update
        elif kind == "config":
            updates = record.config.update
        elif kind == "history":
            run["history"].append({"/".join(item.nested_key) or item.key: json.loads(item.value_json)
                                   for item in record.history.item})
            continue
        elif kind == "metric":
            summary = record.metric.summary
            run["metrics"][record.metric.name] = {
                "step_metric": record.metric.step_metric,
                "summary": sorted(field.name for field, value in summary.ListFields() if value is True),
            }
            continue
        elif kind == "exit":  # run.finish() got this far: everything before it is in the log
            run["finished"] = True
            continue
        elif kind == "artifact":
            artifact = record.artifact
            run["artifacts"].append({
                "name": artifact.name, "type": artifact.type, "aliases": sorted(artifact.aliases),
                "files": sorted(entry.path for entry in artifact.manifest.contents),
                # where wandb staged each file's copy for `wandb sync` to upload (WANDB_DATA_DIR)
                "staged": {entry.path: entry.local_path for entry in artifact.manifest.contents},
                "metadata": json.loads(artifact.metadata) if artifact.metadata else {},
            })
            continue
        elif kind == "summary":
            for item in record.summary.update:
                run["summary"]["/".join(item.nested_key) or item.key] = json.loads(item.value_json)
            continue
        else:
            continue
        for item in updates:
            run["config"][item.key] = json.loads(item.value_json)
    return run


def read_run(folder: Path, ready: Callable[[dict[str, Any]], bool], timeout_s: float = 60.0) -> dict[str, Any]:
    """`parse_run`, retried until `ready(run)` holds or the timeout passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        run = parse_run(folder)
        if ready(run) or time.monotonic() > deadline:
            return run
        time.sleep(0.5)
