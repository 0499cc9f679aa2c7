"""Storage layout under AETRAIN_STORAGE: where runs, checkpoints and artifacts live.

    runs/<job>-<stage>/            Ray Train's run folder (RunConfig(storage_path, name))
    datasets/<id>.npz              an uploaded dataset, checked, as float32 x and int64 y
    jobs/<job>/attempt-<token>/    artifacts written by the runner that held fencing token <token>

A job's record names the artifact folder of the runner that finished it, so files left by a
stale runner are never served. Files are looked up only by names from the job's own list.
"""

from pathlib import Path

from shared.datasets import DATASET_ID
from shared.errors import ArtifactNotFound, DatasetNotFound, ResultNotReady
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
