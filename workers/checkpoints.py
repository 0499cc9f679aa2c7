"""Checkpoints: {model, optimizer, epoch, spec} in one file, loaded without unpickling code.

A checkpoint folder is `state.pt` plus `manifest.json`, written last, with the epoch and
the size and sha256 of every file. A folder whose files do not match its manifest (a save
or a copy cut short, a half-deleted folder, a flipped bit) is never loaded. The hashes, not
the order of writes, are what count: Ray copies the folder to storage in no set order.
"""

import hashlib
import io
import json
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

CHECKPOINT_FILE = "state.pt"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1
CHECKPOINT_GLOB = "checkpoint_*"  # Ray Train's checkpoint_<timestamp> folders in a run folder


class CheckpointCorrupt(ValueError):
    """A checkpoint folder that does not match its manifest, or has none."""

    def __init__(self, folder: str | Path, reason: str) -> None:
        super().__init__(f"checkpoint {folder} is not usable: {reason}")
        self.folder = str(folder)
        self.reason = reason

    def __reduce__(self) -> tuple[type["CheckpointCorrupt"], tuple[str, str]]:
        # Raised on Ray workers and re-raised in the driver: it has to survive pickling.
        return type(self), (self.folder, self.reason)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (nanoGPT's raw_model)."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, nn.Module) else model


def save_checkpoint(
    folder: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    epoch: int,
    spec_json: str,
) -> Path:
    path = Path(folder) / CHECKPOINT_FILE
    state = {
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "spec": spec_json,  # the checkpoint records how it was made
    }
    with path.open("wb") as file:
        torch.save(state, file)
        file.flush()
        os.fsync(file.fileno())  # on disk before a manifest can vouch for it
    write_manifest(folder, epoch, [CHECKPOINT_FILE])
    return path


def write_manifest(folder: str | Path, epoch: int, names: Iterable[str]) -> Path:
    """Record the epoch and each file's size and hash; atomic, so never half a manifest."""
    folder = Path(folder)
    files = {}
    for name in names:
        data = (folder / name).read_bytes()
        files[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest = {"format": MANIFEST_FORMAT, "epoch": epoch, "files": files}
    path = folder / MANIFEST_FILE
    partial = folder / f".{MANIFEST_FILE}.partial"
    with partial.open("w") as file:
        json.dump(manifest, file, indent=1)
        file.flush()
        os.fsync(file.fileno())
    os.replace(partial, path)
    return path


def check(folder: str | Path) -> int:
    """The epoch of a checkpoint whose files all match its manifest; else CheckpointCorrupt."""
    epoch, _ = _verified_files(Path(folder))
    return epoch


def verify(folder: str | Path) -> bool:
    """Whether the folder holds a whole checkpoint: a manifest that its files match."""
    try:
        check(folder)
    except CheckpointCorrupt:
        return False
    return True


def load_state(folder: str | Path) -> dict[str, Any]:
    """The state of a verified checkpoint; CheckpointCorrupt for any other folder."""
    folder = Path(folder)
    _, contents = _verified_files(folder)
    if CHECKPOINT_FILE not in contents:
        raise CheckpointCorrupt(folder, f"its manifest does not list {CHECKPOINT_FILE}")
    # The bytes loaded are the bytes hashed: a file that changes after the check is not read.
    data = io.BytesIO(contents[CHECKPOINT_FILE])
    # weights_only: a checkpoint in shared storage is data, never code to run.
    state: dict[str, Any] = torch.load(data, map_location="cpu", weights_only=True)
    return state


def restore(folder: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Load a checkpoint into model and optimizer; returns the epoch to start from."""
    state = load_state(folder)
    unwrap(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return int(state["epoch"]) + 1


def latest_valid_checkpoint(
    run_folder: str | Path, say: Callable[[str], None] | None = print
) -> Path | None:
    """The whole checkpoint of the highest epoch in a Ray Train run folder, if any.

    Ray's own pick (its snapshot's latest) is not enough: the snapshot does not know a copy
    that was cut short after it, nor a file damaged since.
    """
    say = say or (lambda _: None)
    whole: list[tuple[int, str, Path]] = []
    for folder in checkpoint_folders(run_folder):
        try:
            whole.append((check(folder), folder.name, folder))
        except CheckpointCorrupt as exc:
            say(f"resume: skipped {folder.name}: {exc.reason}")
    if not whole:
        return None
    epoch, name, folder = max(whole)  # ties: the later of Ray's timestamped names
    say(f"resume: from {name} (epoch {epoch})")
    return folder


def checkpoint_folders(run_folder: str | Path) -> list[Path]:
    run_folder = Path(run_folder)
    if not run_folder.is_dir():
        return []
    # is_dir: the glob also matches Ray's checkpoint_manager_snapshot.json
    return sorted(p for p in run_folder.glob(CHECKPOINT_GLOB) if p.is_dir())


def prune_run(
    run_folder: str | Path,
    keep: Iterable[str | Path],
    num_to_keep: int,
    say: Callable[[str], None] | None = print,
) -> list[Path]:
    """Delete the partial checkpoints of a finished run and the oldest beyond num_to_keep + 1.

    `keep` (the run's final checkpoint and the ones Ray's snapshot still lists) is never
    deleted, whole or not: Ray refuses to resume a run whose snapshot names a missing folder.
    Returns the folders deleted.
    """
    say = say or (lambda _: None)
    kept = {Path(p).resolve() for p in keep}
    folders = checkpoint_folders(run_folder)
    whole: list[tuple[int, str, Path]] = []
    deleted: list[Path] = []
    for folder in folders:
        if folder.resolve() in kept:
            continue
        try:
            whole.append((check(folder), folder.name, folder))
        except CheckpointCorrupt as exc:
            say(f"cleanup: deleted {folder.name}: {exc.reason}")
            deleted.append(remove_checkpoint(folder))
    room = max(0, num_to_keep + 1 - sum(1 for f in folders if f.resolve() in kept))
    for _, _, folder in sorted(whole, reverse=True)[room:]:  # newest first, by epoch
        say(f"cleanup: deleted {folder.name}: more than {num_to_keep} + 1 checkpoints")
        deleted.append(remove_checkpoint(folder))
    return deleted


def remove_checkpoint(folder: Path) -> Path:
    # The manifest goes first: a deletion cut short leaves a folder that no longer verifies,
    # never one that looks whole and is not.
    (folder / MANIFEST_FILE).unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)
    return folder


def _read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest, its shape checked; CheckpointCorrupt if missing or malformed."""
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
    except FileNotFoundError:
        raise CheckpointCorrupt(
            folder, f"no {MANIFEST_FILE} (it is written last: an unfinished save)"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointCorrupt(folder, f"{MANIFEST_FILE} unreadable: {exc}") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if (
        not isinstance(files, dict)
        or not files
        or not isinstance(manifest.get("epoch"), int)
        or manifest.get("format") != MANIFEST_FORMAT
        or not all(_is_entry(name, entry) for name, entry in files.items())
    ):
        raise CheckpointCorrupt(folder, f"{MANIFEST_FILE} is malformed")
    return manifest


def _is_entry(name: str, entry: Any) -> bool:
    # Names are plain file names: a manifest in shared storage never points outside its folder.
    return (
        name not in {"", ".", ".."}
        and "/" not in name
        and "\\" not in name
        and isinstance(entry, dict)
        and isinstance(entry.get("size"), int)
        and isinstance(entry.get("sha256"), str)
    )


def _verified_files(folder: Path) -> tuple[int, dict[str, bytes]]:
    """The manifest's epoch and the content of every file it lists, each one checked."""
    manifest = _read_manifest(folder)
    contents = {}
    for name, entry in manifest["files"].items():
        try:
            data = (folder / name).read_bytes()
        except OSError as exc:
            raise CheckpointCorrupt(folder, f"{name}: {exc.strerror or exc}") from None
        if len(data) != entry["size"]:
            raise CheckpointCorrupt(folder, f"{name} has {len(data)} bytes, not {entry['size']}")
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise CheckpointCorrupt(folder, f"{name} does not match its sha256")
        contents[name] = data
    return manifest["epoch"], contents
