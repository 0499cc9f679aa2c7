"""Checkpoints: {model, optimizer, epoch, spec} in one file, loaded without unpickling code.

A checkpoint folder is `state.pt` plus `manifest.json`, written last, with the epoch and
the size and sha256 of every file. A folder whose files do not match its manifest (a save
or a copy cut short, a half-deleted folder, a flipped bit) is never loaded: the hashes, not
the order of writes, are what count. Folders are locations (shared/locations.py): a local
or mounted path, or an s3:// prefix, where there is no rename and a file is one PUT.
"""

import fnmatch
import hashlib
import io
import json
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shared import locations

CHECKPOINT_FILE = "state.pt"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1
CHECKPOINT_GLOB = "checkpoint_*"  # checkpoint_<epoch>[-<token>-<ns>] folders in a run folder


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
    vouch: Callable[[], bool] = lambda: True,
) -> str | None:
    """Write state.pt, then the manifest that vouches for it, into a folder (a path or an
    s3:// location); returns the state file's location. `vouch` is asked between the two: if
    it says no, no manifest is written (the folder stays unfinished, never loaded) and None
    is returned."""
    state = {
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "spec": spec_json,  # the checkpoint records how it was made
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    location = locations.join(folder, CHECKPOINT_FILE)
    locations.write_bytes(location, data, durable=True)  # stored before a manifest vouches
    if not vouch():
        return None
    _put_manifest(folder, epoch, {CHECKPOINT_FILE: data})
    return location


def write_manifest(folder: str | Path, epoch: int, names: Iterable[str]) -> str:
    """Record the epoch and each file's size and hash; written whole, so never half a one."""
    return _put_manifest(
        folder, epoch, {name: locations.read_bytes(locations.join(folder, name)) for name in names}
    )


def _put_manifest(folder: str | Path, epoch: int, contents: dict[str, bytes]) -> str:
    files = {name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
             for name, data in contents.items()}  # fmt: skip
    manifest = {"format": MANIFEST_FORMAT, "epoch": epoch, "files": files}
    location = locations.join(folder, MANIFEST_FILE)
    locations.write_bytes(location, json.dumps(manifest, indent=1).encode(), durable=True)
    return location


def check(folder: str | Path) -> int:
    """The epoch of a checkpoint whose files all match its manifest; else CheckpointCorrupt."""
    epoch, _ = _verified_files(str(folder))
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
    _, contents = _verified_files(str(folder))
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
) -> str | None:
    """The location of the whole checkpoint of the highest epoch in a run folder, if any."""
    say = say or (lambda _: None)
    whole: list[tuple[int, str, str]] = []
    for folder in checkpoint_folders(run_folder):
        name = locations.name_of(folder)
        try:
            whole.append((check(folder), name, folder))
        except CheckpointCorrupt as exc:
            say(f"resume: skipped {name}: {exc.reason}")
    if not whole:
        return None
    epoch, name, folder = max(whole)  # ties: the later name (token and time follow the epoch)
    say(f"resume: from {name} (epoch {epoch})")
    return folder


def checkpoint_folders(run_folder: str | Path) -> list[str]:
    """The locations of the run's checkpoint_* folders, by name."""
    return [locations.join(run_folder, e.name) for e in locations.entries(run_folder)
            if e.is_dir and fnmatch.fnmatchcase(e.name, CHECKPOINT_GLOB)]  # fmt: skip


def prune_run(
    run_folder: str | Path,
    keep: Iterable[str | Path],
    num_to_keep: int,
    say: Callable[[str], None] | None = print,
) -> list[str]:
    """Delete the partial checkpoints of a run and the oldest beyond num_to_keep + 1.

    `keep` (the checkpoint just written, or a new owner's) is never deleted, whole or not.
    Returns the locations deleted.
    """
    say = say or (lambda _: None)
    kept = {_key(p) for p in keep}
    folders = checkpoint_folders(run_folder)
    whole: list[tuple[int, str, str]] = []
    deleted: list[str] = []
    for folder in folders:
        if _key(folder) in kept:
            continue
        try:
            whole.append((check(folder), locations.name_of(folder), folder))
        except CheckpointCorrupt as exc:
            say(f"cleanup: deleted {locations.name_of(folder)}: {exc.reason}")
            deleted.append(remove_checkpoint(folder))
    room = max(0, num_to_keep + 1 - sum(1 for f in folders if _key(f) in kept))
    for _, name, folder in sorted(whole, reverse=True)[room:]:  # newest first, by epoch
        say(f"cleanup: deleted {name}: more than {num_to_keep} + 1 checkpoints")
        deleted.append(remove_checkpoint(folder))
    return deleted


def _key(location: str | Path) -> str:
    """One spelling per folder: local paths resolved, URLs as they are."""
    if locations.is_remote(location):
        return str(location).rstrip("/")
    return str(Path(location).resolve())


def remove_checkpoint(folder: str | Path) -> str:
    # The manifest goes first: a deletion cut short leaves a folder that no longer verifies,
    # never one that looks whole and is not.
    if locations.is_remote(folder):
        locations.remove_tree(locations.join(folder, MANIFEST_FILE))
        locations.remove_tree(folder)
    else:
        Path(folder, MANIFEST_FILE).unlink(missing_ok=True)
        shutil.rmtree(folder, ignore_errors=True)
    return str(folder)


def _read_manifest(folder: str) -> dict[str, Any]:
    """The manifest, its shape checked; CheckpointCorrupt if missing or malformed."""
    try:
        manifest = json.loads(locations.read_bytes(locations.join(folder, MANIFEST_FILE)))
    except (FileNotFoundError, NotADirectoryError):
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


def _verified_files(folder: str) -> tuple[int, dict[str, bytes]]:
    """The manifest's epoch and the content of every file it lists, each one checked."""
    manifest = _read_manifest(folder)
    contents = {}
    for name, entry in manifest["files"].items():
        try:
            data = locations.read_bytes(locations.join(folder, name))
        except OSError as exc:
            raise CheckpointCorrupt(folder, f"{name}: {exc.strerror or exc}") from None
        if len(data) != entry["size"]:
            raise CheckpointCorrupt(folder, f"{name} has {len(data)} bytes, not {entry['size']}")
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise CheckpointCorrupt(folder, f"{name} does not match its sha256")
        contents[name] = data
    return manifest["epoch"], contents
