"""Checkpoints: a manifest written last; a folder that does not match it is never loaded."""

import json
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from torch import nn

from shared.settings import Settings
from shared.specs import parse_job_spec
from shared.storage import LocalStorage
from shared.store import JobStore
from tests.specs import digits_spec
from workers.checkpoints import (
    CHECKPOINT_FILE,
    MANIFEST_FILE,
    CheckpointCorrupt,
    check,
    checkpoint_folders,
    latest_valid_checkpoint,
    load_state,
    prune_run,
    restore,
    save_checkpoint,
    verify,
)
from workers.dispatcher import Dispatcher
from workers.group_pool import GroupPool
from workers.tasks import build_task, find_stage
from workers.train_loop import make_optimizer


def model_and_optimizer(seed: int = 0) -> tuple[nn.Linear, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Linear(64, 64)  # 16 KiB of weights: most of state.pt is tensor bytes
    return model, torch.optim.Adam(model.parameters())


def save(folder: Path, epoch: int) -> Path:
    folder.mkdir(parents=True)
    model, optimizer = model_and_optimizer(epoch)
    save_checkpoint(folder, model, optimizer, epoch, '{"kind": "test"}')
    return folder


def truncate(folder: str | Path) -> None:
    state = Path(folder) / CHECKPOINT_FILE
    state.write_bytes(state.read_bytes()[:-100])


def flip_a_byte(folder: str | Path) -> None:
    state = Path(folder) / CHECKPOINT_FILE
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside the weights: torch itself loads this file
    state.write_bytes(bytes(data))


def drop_manifest(folder: Path) -> None:
    (folder / MANIFEST_FILE).unlink()


def list_a_missing_file(folder: Path) -> None:
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    manifest["files"]["optimizer.pt"] = {"size": 10, "sha256": "0" * 64}
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))


def garble_manifest(folder: Path) -> None:
    (folder / MANIFEST_FILE).write_bytes(b'{"format": 1, "epo\xff')


def point_outside(folder: Path) -> None:
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    manifest["files"] = {"../state.pt": manifest["files"][CHECKPOINT_FILE]}
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))


def test_a_saved_checkpoint_verifies_and_loads(tmp_path: Path) -> None:
    folder = save(tmp_path / "checkpoint_a", epoch=4)
    assert verify(folder) and check(folder) == 4
    assert sorted(p.name for p in folder.iterdir()) == [MANIFEST_FILE, CHECKPOINT_FILE]
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    assert manifest["epoch"] == 4
    assert manifest["files"][CHECKPOINT_FILE]["size"] == (folder / CHECKPOINT_FILE).stat().st_size
    model, optimizer = model_and_optimizer(seed=99)
    assert restore(folder, model, optimizer) == 5
    assert torch.equal(model.weight, model_and_optimizer(seed=4)[0].weight)


@pytest.mark.parametrize(
    "damage",
    [truncate, flip_a_byte, drop_manifest, list_a_missing_file, garble_manifest, point_outside],
)
def test_a_damaged_checkpoint_fails_verify_and_is_never_loaded(
    tmp_path: Path, damage: Callable[[Path], None]
) -> None:
    folder = save(tmp_path / "checkpoint_a", epoch=4)
    damage(folder)
    assert not verify(folder)
    with pytest.raises(CheckpointCorrupt) as raised:
        load_state(folder)
    assert str(folder) in str(raised.value) and raised.value.reason
    with pytest.raises(CheckpointCorrupt):
        restore(folder, *model_and_optimizer())


def test_a_flipped_byte_is_caught_although_torch_would_load_it(tmp_path: Path) -> None:
    folder = save(tmp_path / "checkpoint_a", epoch=4)
    flip_a_byte(folder)
    # The damage is silent to torch: without the manifest these wrong weights would load.
    torch.load(folder / CHECKPOINT_FILE, weights_only=True)
    with pytest.raises(CheckpointCorrupt, match="sha256"):
        load_state(folder)


def test_checkpoint_corrupt_survives_pickle() -> None:
    error = pickle.loads(pickle.dumps(CheckpointCorrupt("/runs/x/checkpoint_1", "no manifest")))
    assert isinstance(error, CheckpointCorrupt) and isinstance(error, ValueError)
    assert (error.folder, error.reason) == ("/runs/x/checkpoint_1", "no manifest")
    assert "checkpoint_1" in str(error)


def test_resume_picks_the_newest_whole_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    save(run / "checkpoint_2025-01-01_00-00-01.000000", epoch=1)
    best = save(run / "checkpoint_2025-01-01_00-00-03.000000", epoch=3)
    truncate(save(run / "checkpoint_2025-01-01_00-00-05.000000", epoch=5))
    # Interrupted saves: the state written but no manifest yet; a half-written state file.
    unfinished = save(run / "checkpoint_2025-01-01_00-00-07.000000", epoch=7)
    drop_manifest(unfinished)
    half = save(run / "checkpoint_2025-01-01_00-00-09.000000", epoch=9)
    drop_manifest(half)
    truncate(half)
    (run / "checkpoint_manager_snapshot.json").write_text("{}")  # Ray's, not a checkpoint
    lines: list[str] = []
    assert latest_valid_checkpoint(run, lines.append) == str(best)
    assert lines[-1] == f"resume: from {best.name} (epoch 3)"
    skipped = "\n".join(lines[:-1])
    for name in ("00-00-05", "00-00-07", "00-00-09"):
        assert name in skipped
    model, optimizer = model_and_optimizer()
    assert restore(best, model, optimizer) == 4  # the first epoch after the resume


def test_resume_starts_over_when_no_checkpoint_is_whole(tmp_path: Path) -> None:
    assert latest_valid_checkpoint(tmp_path / "absent", None) is None
    drop_manifest(save(tmp_path / "run" / "checkpoint_a", epoch=2))
    assert latest_valid_checkpoint(tmp_path / "run", None) is None


def test_a_manifest_cut_short_leaves_the_checkpoint_unfinished(tmp_path: Path) -> None:
    folder = save(tmp_path / "run" / "checkpoint_a", epoch=2)
    # The manifest is written to a side file and renamed: a crash leaves only the side file.
    (folder / MANIFEST_FILE).rename(folder / f".{MANIFEST_FILE}.partial")
    assert not verify(folder)
    assert latest_valid_checkpoint(tmp_path / "run", None) is None


def test_cleanup_keeps_the_final_and_the_newest_and_removes_partial_ones(tmp_path: Path) -> None:
    run = tmp_path / "run"
    for epoch in (1, 3, 5, 7):
        save(run / f"checkpoint_2025-01-01_00-00-0{epoch}.000000", epoch=epoch)
    final = save(run / "checkpoint_2025-01-01_00-00-09.000000", epoch=9)
    drop_manifest(save(run / "checkpoint_2025-01-01_00-00-10.000000", epoch=10))
    truncate(save(run / "checkpoint_2025-01-01_00-00-11.000000", epoch=11))
    snapshot = run / "checkpoint_manager_snapshot.json"
    snapshot.write_text("{}")

    deleted = prune_run(run, keep=[str(final)], num_to_keep=2, say=None)

    left = checkpoint_folders(run)
    assert [check(f) for f in left] == [5, 7, 9]  # num_to_keep + 1, the final among them
    assert str(final) in left and snapshot.exists()
    assert sorted(Path(p).name for p in deleted) == [
        f"checkpoint_2025-01-01_00-00-{second}.000000" for second in ("01", "03", "10", "11")
    ]


def test_cleanup_never_deletes_what_it_is_told_to_keep(tmp_path: Path) -> None:
    run = tmp_path / "run"
    oldest = save(run / "checkpoint_1", epoch=1)
    for epoch in (3, 5):
        save(run / f"checkpoint_{epoch}", epoch=epoch)
    final = save(run / "checkpoint_9", epoch=9)
    truncate(final)  # kept even so: it is what the stage's result points to
    prune_run(run, keep=[final, oldest], num_to_keep=2, say=None)
    left = [Path(f).name for f in checkpoint_folders(run)]
    assert left == ["checkpoint_1", "checkpoint_5", final.name]


def stage_model(spec: dict[str, Any]) -> tuple[nn.Module, Any]:
    """The model and optimizer of the autoencoder stage of `spec`, fresh."""
    job_spec = parse_job_spec(spec)
    task = build_task(job_spec, find_stage(job_spec, "train"), {}, None)
    training = task.training
    optimizer = make_optimizer(task.model, training.optimizer, training.lr, training.weight_decay)
    return task.model, optimizer


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_a_run_skips_partial_checkpoints_keeps_whole_ones_and_resumes_past_damage(
    client: TestClient, store: JobStore, storage: LocalStorage, settings: Settings,
    ray_address: str,
    group_pool: GroupPool,
) -> None:  # fmt: skip
    spec = digits_spec(epochs=8, checkpoint_every=2, checkpoints_to_keep=2)
    job_id = client.post("/v1/jobs", json=spec).json()["id"]
    run = storage.runs_root / storage.run_name(job_id, "train")
    # Left in the run folder by an earlier attempt of the stage: checkpoints of the stage's
    # own model, which would load (and skip epochs) if anything trusted them.
    model, optimizer = stage_model(spec)
    damaged = run / "checkpoint_2000-01-01_00-00-05.000000"
    damaged.mkdir(parents=True)
    save_checkpoint(damaged, model, optimizer, 5, "{}")
    flip_a_byte(damaged)
    unfinished = run / "checkpoint_9999-12-31_23-59-59.999999"  # sorts after everything
    unfinished.mkdir()
    save_checkpoint(unfinished, model, optimizer, 6, "{}")
    drop_manifest(unfinished)

    Dispatcher(store, storage, settings.require_redis_url(), ray_address,
               pool=group_pool).run_once(2000)  # fmt: skip
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["state"] == "succeeded", job["error"]
    epochs = [m["epoch"] for m in store.metrics_history(job_id) if m["stage"] == "train"]
    assert epochs == list(range(8))  # from the start: neither was loaded
    (log,) = (storage.root / "jobs" / job_id / "logs").glob("train-attempt-*.log")
    for skipped in (damaged, unfinished):
        assert f"resume: skipped {skipped.name}" in log.read_text()
    # The cleanup after each checkpoint removed both, and the oldest beyond num_to_keep + 1.
    folders = checkpoint_folders(run)
    assert 1 <= len(folders) <= 2 + 1 and all(verify(f) for f in folders)
    assert str(damaged) not in folders and str(unfinished) not in folders
    assert sorted(check(f) for f in folders) == [5, 7]

    # Damaged after the run, the newest is passed over on a restart for the newest whole
    # one, and training would go on from the epoch after that one.
    (latest,) = (f for f in folders if check(f) == 7)
    truncate(latest)
    model, optimizer = stage_model(spec)
    lines: list[str] = []
    found = latest_valid_checkpoint(run, lines.append)
    assert found is not None and restore(found, model, optimizer) == 5 + 1
    assert lines[0].startswith(f"resume: skipped {Path(latest).name}")
    (previous,) = (f for f in folders if verify(f))
    assert lines[1] == f"resume: from {Path(previous).name} (epoch 5)"
    saved = load_state(previous)["model"]
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
