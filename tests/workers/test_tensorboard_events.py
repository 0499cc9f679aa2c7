"""TensorBoard event files, read back as TensorBoard reads them (TFRecord framing, each
record checked against its CRC-32C), hold every metric of the history at its epoch."""

import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tensorboardX.crc32c import crc32c
from tensorboardX.proto.event_pb2 import Event

from shared.specs import parse_job_spec
from tests.specs import digits_spec
from workers.artifacts import ArtifactWriter
from workers.tasks import job_split
from workers.tensorboard_events import event_file_name, event_files

pytestmark = pytest.mark.timeout(120)


def masked(data: bytes) -> int:
    """TFRecord's masked CRC-32C, written out here from the format's definition."""
    crc = int(crc32c(data))
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_events(data: bytes) -> list[Event]:
    events, at = [], 0
    while at < len(data):
        (length,) = struct.unpack_from("<Q", data, at)
        (length_crc,) = struct.unpack_from("<I", data, at + 8)
        assert length_crc == masked(data[at : at + 8])
        body = data[at + 12 : at + 12 + length]
        (body_crc,) = struct.unpack_from("<I", data, at + 12 + length)
        assert body_crc == masked(body)
        events.append(Event.FromString(body))
        at += 12 + length + 4
    assert at == len(data)  # no torn record at the end
    return events


def scalars_by_step(events: list[Event]) -> dict[int, dict[str, float]]:
    return {e.step: {v.tag: v.simple_value for v in e.summary.value} for e in events[1:]}


def history() -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for stage, epochs in (("layer1", 4), ("layer2", 3)):
        for epoch in range(epochs):
            rows.append({"stage": stage, "epoch": epoch, "token": 2,
                         "train_loss": 0.3 / (epoch + 1), "val_mse": 0.31 / (epoch + 1),
                         "epoch_seconds": 0.5, "samples_per_s": 3000.0 + epoch})  # fmt: skip
    rows[2]["val_mse"] = None  # was not finite: left out, as a gap
    return rows


def test_event_files_hold_every_metric_of_every_epoch_one_run_per_stage() -> None:
    rows = history()
    files = event_files(rows, {"layer1": 1_700_000_000.0})
    assert list(files) == ["tensorboard/layer1/events.out.tfevents.layer1",
                           "tensorboard/layer2/events.out.tfevents.layer2"]  # fmt: skip
    for stage, data in zip(("layer1", "layer2"), files.values(), strict=True):
        events = read_events(data)
        assert events[0].file_version == "brain.Event:2"
        expected = {
            row["epoch"]: {k: np.float32(v) for k, v in row.items()  # TensorBoard's float32
                           if k not in ("stage", "epoch", "token") and v is not None}
            for row in rows if row["stage"] == stage
        }  # fmt: skip
        assert scalars_by_step(events) == expected
    layer1 = read_events(files["tensorboard/layer1/events.out.tfevents.layer1"])
    # The stage's start plus the epoch seconds so far: TensorBoard's relative axis is training.
    assert [e.wall_time for e in layer1] == [1_700_000_000.0 + 0.5 * i for i in range(5)]


def test_stage_names_that_are_not_one_folder_are_refused() -> None:
    for stage in ("..", "../x", "a/b", "", ".hidden", "a\\b"):
        with pytest.raises(ValueError, match="cannot name a folder"):
            event_file_name(stage)


def test_the_writer_lists_the_curves_and_event_files_it_wrote(tmp_path: Path) -> None:
    writer = ArtifactWriter(tmp_path, job_split(parse_job_spec(digits_spec()), None))
    rows = history()
    writer.curves(rows, ["layer1", "layer2"])
    writer.tensorboard(rows)
    assert writer.names == ["curves.png", "tensorboard/layer1/events.out.tfevents.layer1",
                            "tensorboard/layer2/events.out.tfevents.layer2"]  # fmt: skip
    assert (tmp_path / "curves.png").read_bytes().startswith(b"\x89PNG")
    written = (tmp_path / writer.names[1]).read_bytes()
    assert scalars_by_step(read_events(written))[3]["train_loss"] == np.float32(0.3 / 4)
    assert not list(tmp_path.rglob("*.tmp"))
