"""Storage layout under AETRAIN_STORAGE: where runs, checkpoints and artifacts live.

    runs/<job>-<stage>/            Ray Train's run folder (RunConfig(storage_path, name))
    datasets/<id>.npz              an uploaded dataset, checked, as float32 x and int64 y
                                   (deflate level 1: see service/uploads.py)
    datasets/<id>.json             its DatasetFacts, written after the .npz: the pair is whole
    jobs/<job>/attempt-<token>/    artifacts written by the runner that held fencing token <token>

A job's record names the artifact folder of the runner that finished it, so files left by a
stale runner are never served. Files are looked up only by names from the job's own list.
"""

import os
import re
import shutil
import stat
import uuid
from pathlib import Path

from pydantic import ValidationError

from shared.datasets import DATASET_ID, DatasetFacts
from shared.errors import ArtifactNotFound, DatasetNotFound, JobNotFound, ResultNotReady
from shared.jobs import JobRecord, JobState

ENCODER_FILES = {"torchscript": "encoder.pt", "safetensors": "encoder.safetensors"}


class Storage:
    def __init__(self, root: str) -> None:
        if "://" in root:
            raise ValueError(
                f"AETRAIN_STORAGE={root!r}: only local or mounted (NFS) paths are supported yet"
            )
        self.root = Path(root).resolve()

    @property
    def runs_root(self) -> Path:
        return self.root / "runs"

    @property
    def datasets_root(self) -> Path:
        return self.root / "datasets"

    @property
    def incoming(self) -> Path:
        """Uploads being received; nothing here is ever read by a job."""
        return self.datasets_root / "incoming"

    def dataset_file(self, dataset_id: str) -> Path:
        if not DATASET_ID.match(dataset_id):  # ids come from our index; never build odd paths
            raise DatasetNotFound(dataset_id)
        return self.datasets_root / f"{dataset_id}.npz"

    def dataset_facts_file(self, dataset_id: str) -> Path:
        return self.dataset_file(dataset_id).with_suffix(".json")

    def stored_facts(self, dataset_id: str) -> DatasetFacts | None:
        """The facts of a dataset stored whole, or None: then it must be parsed (again)."""
        try:
            if not self.dataset_file(dataset_id).is_file():
                return None
            facts = DatasetFacts.model_validate_json(
                self.dataset_facts_file(dataset_id).read_bytes()
            )
        except (OSError, ValidationError):  # absent, or not ours: parse the upload again
            return None
        return facts if facts.id == dataset_id else None

    def save_facts(self, facts: DatasetFacts) -> None:
        """Write datasets/<id>.json atomically; call it once the .npz is in place."""
        target = self.dataset_facts_file(facts.id)
        partial = target.with_name(f".{target.name}.{uuid.uuid4().hex}.part")
        try:
            partial.write_text(facts.model_dump_json())
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)

    @staticmethod
    def run_name(job_id: str, stage: str) -> str:
        """Ray Train run name: fixed per job and stage, so a taken-over job resumes."""
        return f"{job_id}-{stage}"

    def attempt_folder(self, job_id: str, token: int) -> str:
        """Artifact folder of one runner, relative to the root."""
        return f"jobs/{job_id}/attempt-{token}"

    def artifact_path(self, job: JobRecord, name: str) -> Path:
        """The file of artifact `name` of a finished job; names not in its list are refused."""
        if job.state is not JobState.SUCCEEDED or job.result is None:
            raise ResultNotReady(job.id, job.state, job.error)
        artifacts: list[str] = job.result["artifacts"]
        if name not in artifacts:
            raise ArtifactNotFound(job.id, name)
        folder: str = job.result["folder"]
        path = (self.root / folder / name).resolve()
        # The list and folder come from our own records; still, nothing outside the root is
        # ever served, even through a bad record or a symlink.
        if not path.is_relative_to(self.root) or not path.is_file():
            raise ArtifactNotFound(job.id, name)
        return path

    # -- deleting (DELETE routes) and sweeping (workers/janitor.py) ---------------------------
    @property
    def jobs_root(self) -> Path:
        return self.root / "jobs"

    def job_folder(self, job_id: str) -> Path:
        """jobs/<job>/: the job's attempt folders (artifacts) and its stage logs and configs."""
        if not _SAFE_JOB_ID.match(job_id):
            raise JobNotFound(job_id)
        return self.jobs_root / job_id

    def run_folders(self, job_id: str) -> list[Path]:
        """runs/<job>-<stage>/ of every stage of a job: Ray Train's runs and checkpoints."""
        if not _SAFE_JOB_ID.match(job_id):
            raise JobNotFound(job_id)
        if not self.runs_root.is_dir():
            return []
        return sorted(p for p in self.runs_root.iterdir() if p.name.startswith(f"{job_id}-"))

    def delete_job_files(self, job_id: str) -> int:
        """Delete a job's artifacts, logs, checkpoints and run folders; returns bytes freed."""
        return sum(self.remove(path) for path in [self.job_folder(job_id),
                                                  *self.run_folders(job_id)])  # fmt: skip

    def delete_dataset_files(self, dataset_id: str) -> int:
        """Delete an upload's .npz and its .json sidecar; returns bytes freed."""
        npz = self.dataset_file(dataset_id)
        return self.remove(npz) + self.remove(npz.with_suffix(".json"))

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


_SAFE_JOB_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # never a path separator, dot or glob


def tree_bytes(folder: Path) -> int:
    """Bytes of the files under `folder`, links not followed."""
    total = 0
    for parent, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(parent, name)).st_size
            except FileNotFoundError:
                continue
    return total
