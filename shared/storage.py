"""Storage layout under AETRAIN_STORAGE: where runs, checkpoints and artifacts live.

    runs/<job>-<stage>/            a stage's run folder: its checkpoints (workers/checkpoints.py)
    datasets/<id>.npz              an uploaded dataset, checked, as float32 x and int64 y
                                   (deflate level 1: see service/uploads.py)
    datasets/<id>.json             its DatasetFacts, written after the .npz: the pair is whole
    jobs/<job>/attempt-<token>/    artifacts written by the runner that held fencing token <token>
    jobs/<job>/logs/               the stages' logs, a file per stage and run

AETRAIN_STORAGE is a local or mounted (NFS) folder (`LocalStorage`) or an s3:// URL
(`ObjectStorage`, shared/object_storage.py); `open_storage` picks. Everything outside this
module and that one names files by their place in this layout, and processes on other nodes
get locations (shared/locations.py), never paths that only one machine has.

A job's record names the artifact folder of the runner that finished it, so files left by a
stale runner are never served. Files are looked up only by names from the job's own list.
"""

import os
import re
import shutil
import stat
import tempfile
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pydantic import ValidationError

from shared import locations
from shared.datasets import DATASET_ID, DatasetFacts
from shared.errors import ArtifactNotFound, DatasetNotFound, JobNotFound, ResultNotReady
from shared.jobs import JobRecord, JobState
from shared.locations import Entry

ENCODER_FILES = {"torchscript": "encoder.pt", "safetensors": "encoder.safetensors"}
_SAFE_JOB_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # never a path separator, dot or glob


def open_storage(root: str) -> "Storage":
    """The storage AETRAIN_STORAGE names: an s3:// URL or a local (mounted) folder."""
    if locations.is_remote(root):
        from shared.object_storage import ObjectStorage

        return ObjectStorage(root)
    if "://" in root:
        raise ValueError(
            f"AETRAIN_STORAGE={root!r}: a local or mounted path, or s3://bucket/prefix"
        )
    return LocalStorage(root)


class Storage(ABC):
    """The layout, on whichever store holds it; relative names are `/`-separated."""

    @abstractmethod
    def location(self, relative: str) -> str:
        """Where `relative` lies, as a location any node can reach (shared/locations.py)."""

    def relative_name(self, location: str) -> str:
        """`location` relative to the root where it lies in this store: what a record keeps, so
        that the storage may move (a copy to a new folder or bucket); anything else as it is."""
        root = self.location("").rstrip("/") + "/"
        return location[len(root) :] if location.startswith(root) else location

    def locate(self, name: str) -> str:
        """The location of a name a record keeps: relative names lie in this store; an
        absolute path or a URL (records written before names were relative) is as it is."""
        if locations.is_remote(name) or name.startswith("/"):
            return name
        return self.location(name)

    @property
    def datasets_location(self) -> str:
        return self.location("datasets")

    @property
    @abstractmethod
    def incoming(self) -> Path:
        """A local folder for uploads being received; nothing here is ever read by a job."""

    @abstractmethod
    def free_bytes(self) -> int:
        """Free space where files are written before they are kept (checked before uploads
        and stages: a full disk fails clearly, not halfway)."""

    @staticmethod
    def run_name(job_id: str, stage: str) -> str:
        """Run folder name: fixed per job and stage, so a taken-over job resumes."""
        return f"{job_id}-{stage}"

    def run_location(self, job_id: str, stage: str) -> str:
        return self.location(f"runs/{self.run_name(job_id, stage)}")

    def attempt_folder(self, job_id: str, token: int) -> str:
        """Artifact folder of one runner, relative to the root."""
        return f"jobs/{job_id}/attempt-{token}"

    def logs_folder(self, job_id: str) -> str:
        """jobs/<job>/logs, relative to the root."""
        return f"{self._job_relative(job_id)}/logs"

    # -- datasets ---------------------------------------------------------------------------------
    def dataset_relative(self, dataset_id: str) -> str:
        if not DATASET_ID.match(dataset_id):  # ids come from our index; never build odd paths
            raise DatasetNotFound(dataset_id)
        return f"datasets/{dataset_id}.npz"

    def dataset_facts_relative(self, dataset_id: str) -> str:
        """datasets/<id>.json: the facts that vouch for the .npz beside them."""
        return self.dataset_relative(dataset_id)[: -len(".npz")] + ".json"

    @abstractmethod
    def dataset_staging(self, dataset_id: str) -> Path:
        """The local file an upload's checked .npz is written to, before `keep_dataset`; one
        of its own for each call (two uploads of the same bytes may run at once)."""

    @abstractmethod
    def keep_dataset(self, facts: DatasetFacts, staged: Path) -> None:
        """Store the .npz staged for `facts.id`, then its facts: once the facts are there,
        the dataset is whole."""

    def stored_facts(self, dataset_id: str) -> DatasetFacts | None:
        """The facts of a dataset stored whole, or None: then it must be parsed (again)."""
        relative = self.dataset_relative(dataset_id)
        try:
            if locations.size_of(self.location(relative)) is None:
                return None
            raw = locations.read_bytes(self.location(self.dataset_facts_relative(dataset_id)))
            facts = DatasetFacts.model_validate_json(raw)
        except (OSError, ValidationError):  # absent, or not ours: parse the upload again
            return None
        return facts if facts.id == dataset_id else None

    def delete_dataset_files(self, dataset_id: str) -> int:
        """Delete an upload's .npz and its .json sidecar; returns bytes freed."""
        return self.remove_at(self.dataset_relative(dataset_id)) + self.remove_at(
            self.dataset_facts_relative(dataset_id)
        )

    # -- artifacts --------------------------------------------------------------------------------
    def artifact(self, job: JobRecord, name: str) -> str:
        """The location of artifact `name` of a finished job; names not in its list are
        refused, and so is anything but a regular file inside the store."""
        if job.state is not JobState.SUCCEEDED or job.result is None:
            raise ResultNotReady(job.id, job.state, job.error)
        artifacts: list[str] = job.result["artifacts"]
        if name not in artifacts:
            raise ArtifactNotFound(job.id, name)
        folder: str = job.result["folder"]
        # A `..` means nothing to a bucket but a folder to a disk: refused on both, although
        # the names come from our own records.
        if any(part in {"", ".", ".."} for part in f"{folder}/{name}".split("/")):
            raise ArtifactNotFound(job.id, name)
        found = self._stored_file(f"{folder}/{name}")
        if found is None:
            raise ArtifactNotFound(job.id, name)
        return found

    @abstractmethod
    def _stored_file(self, relative: str) -> str | None:
        """The location of a regular file inside the store, or None."""

    @contextmanager
    def artifact_files(self, job: JobRecord, names: list[str]) -> Iterator[Path]:
        """A local folder holding these artifacts of a finished job (for code that reads
        files, such as interpolation); on object storage, a copy that goes afterwards."""
        found = {name: self.artifact(job, name) for name in names}
        if not any(locations.is_remote(f) for f in found.values()):
            yield Path(next(iter(found.values()))).parent
            return
        with tempfile.TemporaryDirectory(dir=locations.scratch_folder("artifacts")) as tmp:
            for name, location in found.items():
                locations.download(location, Path(tmp) / name)
            yield Path(tmp)

    @abstractmethod
    @contextmanager
    def writable_folder(self, relative: str) -> Iterator[Path]:
        """A local folder whose files end up at `relative` once the block ends without error."""

    # -- listing and deleting (DELETE routes, workers/janitor.py) ---------------------------------
    @abstractmethod
    def entries(self, relative: str) -> list[Entry]:
        """What a folder of the store holds; [] if absent (or, locally, not inside the root)."""

    @abstractmethod
    def remove_at(self, relative: str) -> int:
        """Delete a file or folder of the store; returns bytes freed (0: absent)."""

    def _job_relative(self, job_id: str) -> str:
        if not _SAFE_JOB_ID.match(job_id):
            raise JobNotFound(job_id)
        return f"jobs/{job_id}"

    def run_folder_names(self, job_id: str) -> list[str]:
        """runs/<job>-<stage>/ of every stage of a job, relative to the root."""
        self._job_relative(job_id)  # checks the id
        return [f"runs/{e.name}" for e in self.entries("runs") if e.name.startswith(f"{job_id}-")]

    def delete_job_files(self, job_id: str) -> int:
        """Delete a job's artifacts, logs, checkpoints and run folders; returns bytes freed."""
        names = [self._job_relative(job_id), *self.run_folder_names(job_id)]
        return sum(self.remove_at(name) for name in names)


class LocalStorage(Storage):
    """The layout in a local or mounted (NFS) folder."""

    def __init__(self, root: str) -> None:
        if "://" in root:
            raise ValueError(f"{root!r} is a URL; open it with open_storage")
        self.root = Path(root).resolve()

    def location(self, relative: str) -> str:
        return str(self.root / relative)

    @property
    def runs_root(self) -> Path:
        return self.root / "runs"

    @property
    def datasets_root(self) -> Path:
        return self.root / "datasets"

    @property
    def incoming(self) -> Path:
        return self.datasets_root / "incoming"

    @property
    def jobs_root(self) -> Path:
        return self.root / "jobs"

    def dataset_file(self, dataset_id: str) -> Path:
        return self.root / self.dataset_relative(dataset_id)

    def dataset_facts_file(self, dataset_id: str) -> Path:
        return self.root / self.dataset_facts_relative(dataset_id)

    def dataset_staging(self, dataset_id: str) -> Path:
        # Written in place (renamed into it whole, service/uploads.py): the facts, written
        # last, vouch for it.
        return self.dataset_file(dataset_id)

    def keep_dataset(self, facts: DatasetFacts, staged: Path) -> None:
        self.save_facts(facts)

    def save_facts(self, facts: DatasetFacts) -> None:
        """Write datasets/<id>.json atomically; call it once the .npz is in place."""
        target = self.dataset_facts_file(facts.id)
        partial = target.with_name(f".{target.name}.{uuid.uuid4().hex}.part")
        try:
            partial.write_text(facts.model_dump_json())
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)

    def artifact_path(self, job: JobRecord, name: str) -> Path:
        """`artifact` as a Path."""
        return Path(self.artifact(job, name))

    def _stored_file(self, relative: str) -> str | None:
        path = (self.root / relative).resolve()
        # The list and folder come from our own records; still, nothing outside the root is
        # ever served, even through a bad record or a symlink.
        if not path.is_relative_to(self.root) or not path.is_file():
            return None
        return str(path)

    @contextmanager
    def writable_folder(self, relative: str) -> Iterator[Path]:
        folder = self.root / relative
        folder.mkdir(parents=True, exist_ok=True)
        yield folder

    def job_folder(self, job_id: str) -> Path:
        """jobs/<job>/: the job's attempt folders (artifacts) and its stage logs and configs."""
        return self.root / self._job_relative(job_id)

    def run_folders(self, job_id: str) -> list[Path]:
        """runs/<job>-<stage>/ of every stage of a job: their checkpoints."""
        return [self.root / name for name in sorted(self.run_folder_names(job_id))]

    def entries(self, relative: str) -> list[Entry]:
        folder = self.root / relative
        try:
            if not folder.resolve().is_relative_to(self.root):
                return []
        except OSError:
            return []
        return locations.entries(folder)

    def remove_at(self, relative: str) -> int:
        return self.remove(self.root / relative)

    def remove(self, path: Path) -> int:
        """Delete a file or folder that lies inside the root; returns bytes freed (0: absent).

        Symlinks are never followed: a link is removed itself, and rmtree unlinks the links it
        meets without entering them. A path whose folder resolves outside the root is refused.
        """
        if not path.parent.resolve().is_relative_to(self.root):
            raise ValueError(f"{path} lies outside the storage root {self.root}")
        try:
            info = path.lstat()
        except FileNotFoundError:
            return 0
        if not stat.S_ISDIR(info.st_mode):  # a file or a symlink (to anything)
            path.unlink(missing_ok=True)
            return info.st_size
        size = tree_bytes(path)
        try:
            shutil.rmtree(path)
        except FileNotFoundError:  # a concurrent sweep took part of it; the rest goes next time
            pass
        return size

    def free_bytes(self) -> int:
        """Free space on the storage's file system (of the nearest existing folder)."""
        folder = self.root
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        return shutil.disk_usage(folder).free


def tree_bytes(folder: Path) -> int:
    """Bytes of the files under `folder`, links not followed."""
    return locations.tree_bytes(folder)
