"""The storage layout (shared/storage.py) on S3 or an S3-compatible store: AETRAIN_STORAGE=s3://bucket/prefix.

An object store has no rename, so nothing here relies on one. Each file is one PUT, which
lands whole or not at all; a dataset's facts are written after its .npz, a checkpoint's
manifest after its state (workers/checkpoints.py), and a job's record names its artifact
folder only after every file in it is stored: whatever vouches for a file is written last.

Files are staged in a local scratch folder on their way in (uploads being checked, a job's
artifacts being made), so free_bytes is the scratch folder's disk.
"""

import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from shared import locations
from shared.datasets import DatasetFacts
from shared.locations import Entry
from shared.storage import Storage


class ObjectStorage(Storage):
    def __init__(self, url: str) -> None:
        self.url = locations.check_url(url)
        self.scratch = locations.scratch_folder("scratch")

    def location(self, relative: str) -> str:
        return locations.join(self.url, relative)

    @property
    def incoming(self) -> Path:
        return self.scratch / "incoming"

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.scratch).free

    def dataset_staging(self, dataset_id: str) -> Path:
        folder = self.scratch / "datasets"
        folder.mkdir(parents=True, exist_ok=True)
        self.dataset_relative(dataset_id)  # checks the id
        return folder / f"{dataset_id}-{uuid.uuid4().hex}.npz"

    def keep_dataset(self, facts: DatasetFacts, staged: Path) -> None:
        relative = self.dataset_relative(facts.id)
        try:
            locations.upload(staged, self.location(relative))
        finally:
            staged.unlink(missing_ok=True)
        facts_location = self.location(self.dataset_facts_relative(facts.id))
        locations.write_bytes(facts_location, facts.model_dump_json().encode())

    def _stored_file(self, relative: str) -> str | None:
        location = self.location(relative)
        return location if locations.size_of(location) is not None else None

    @contextmanager
    def writable_folder(self, relative: str) -> Iterator[Path]:
        with tempfile.TemporaryDirectory(dir=self.scratch, prefix="folder-") as tmp:
            yield Path(tmp)
            locations.upload_tree(Path(tmp), self.location(relative))

    def entries(self, relative: str) -> list[Entry]:
        return locations.entries(self.location(relative))

    def remove_at(self, relative: str) -> int:
        return locations.remove_tree(self.location(relative))
