"""TensorBoard event files of a job's per-epoch metrics, built at finalize from the metrics
history, so the training loop pays nothing for them.

One run per stage, `tensorboard/<stage>/events.out.tfevents.<stage>` in the attempt folder:
`tensorboard --logdir <storage>/jobs` shows each stage of each job as a run (TensorBoard reads
any file with `tfevents` in its name). Every numeric metric of an epoch is a scalar under its
metrics.jsonl key, at step = epoch. Values are float32, as TensorBoard keeps scalars.

The file is built in memory with tensorboardX's protos and CRC (tensorboardX comes with Ray
Train), not with its SummaryWriter: that starts a thread and a queue per writer and names
the file after the clock and the host, where artifact names must be known before they are
served. The format is TFRecord: each Event framed as its length (uint64), the masked CRC-32C
of the length, the bytes, and their masked CRC-32C, all little-endian.
"""

import re
import struct
import time
from collections.abc import Mapping
from typing import Any

from tensorboardX.proto.event_pb2 import Event
from tensorboardX.proto.summary_pb2 import Summary
from tensorboardX.record_writer import masked_crc32c

NOT_SCALARS = frozenset({"stage", "epoch", "token"})  # the row's key and its fencing token
FILE_VERSION = "brain.Event:2"  # the first event of every file, as TensorFlow writes it
_SAFE_STAGE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")  # a folder name, never `..`


def event_file_name(stage: str) -> str:
    """The artifact name of a stage's event file: a path under the attempt folder."""
    if not _SAFE_STAGE.match(stage):
        raise ValueError(f"stage name {stage!r} cannot name a folder")
    return f"tensorboard/{stage}/events.out.tfevents.{stage}"


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The numbers of one metrics row that TensorBoard draws (a None, not finite once, is left
    out, as a gap)."""
    return {
        key: float(value)
        for key, value in row.items()
        if key not in NOT_SCALARS and isinstance(value, int | float) and not isinstance(value, bool)
    }


def event_files(
    history: list[dict[str, Any]], started: Mapping[str, float] | None = None
) -> dict[str, bytes]:
    """Artifact name -> bytes of the event file of every stage with metrics in `history`.

    An epoch's wall time is its stage's start (`started`, Unix seconds; else now) plus the
    epoch seconds so far: the history keeps no clock time, and this makes TensorBoard's
    relative axis the training time.
    """
    now = time.time()
    by_stage: dict[str, list[dict[str, Any]]] = {}
    for row in history:
        by_stage.setdefault(row["stage"], []).append(row)
    return {
        event_file_name(stage): stage_events(rows, (started or {}).get(stage, now))
        for stage, rows in by_stage.items()
    }


def stage_events(rows: list[dict[str, Any]], started: float) -> bytes:
    """One event file: the file version, then one event per epoch with all its scalars."""
    events = [Event(wall_time=started, file_version=FILE_VERSION)]
    elapsed = 0.0
    for row in sorted(rows, key=lambda row: row["epoch"]):
        seconds = row.get("epoch_seconds")
        elapsed += float(seconds) if isinstance(seconds, int | float) else 0.0
        values = [Summary.Value(tag=key, simple_value=value) for key, value in scalars(row).items()]
        events.append(Event(wall_time=started + elapsed, step=int(row["epoch"]),
                            summary=Summary(value=values)))  # fmt: skip
    return b"".join(_record(event.SerializeToString()) for event in events)


def _record(data: bytes) -> bytes:
    header = struct.pack("<Q", len(data))
    return (header + struct.pack("<I", masked_crc32c(header))
            + data + struct.pack("<I", masked_crc32c(data)))  # fmt: skip
