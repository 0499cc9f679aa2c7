"""A stage's log, written by rank 0: appended to a file, or kept on object storage.

On a disk every line is appended and flushed as it is said. An object cannot be appended
to, so on object storage the lines go to a local file whose whole content is stored again
every PUBLISH_S while there are new lines, and once more at the end: a reader (GET
/v1/jobs/{id}/logs, the error tail on the record) sees the log at most that far behind,
and a rank killed outright loses at most that much of it. A restart of the same run (same
fencing token) carries on the same log.
"""

import logging
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from shared import locations

PUBLISH_S = 2.0

Say = Callable[[str], None]
log = logging.getLogger("aetrain.worker")


@contextmanager
def stage_log(location: str) -> Iterator[Say]:
    """`say(line)` for the log at `location` (a path or an s3:// URL), timestamped."""
    if not locations.is_remote(location):
        path = Path(location)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as file:
            yield _writer(file, lambda: None)
        return
    with tempfile.TemporaryDirectory(dir=locations.scratch_folder("logs")) as tmp:
        local = Path(tmp) / "stage.log"
        try:
            locations.download(location, local)  # an earlier start of this run
        except FileNotFoundError:
            local.touch()
        publisher = _Publisher(local, location)
        with local.open("a") as file:
            try:
                yield _writer(file, publisher.changed.set)
            finally:
                file.flush()
                publisher.close()


class _Publisher:
    """Stores the local copy whole, at most every PUBLISH_S while it changes, and at close."""

    def __init__(self, local: Path, location: str) -> None:
        self.local, self.location = local, location
        self.changed, self.closing = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._run, name="stage-log", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.closing.is_set():
            if self.changed.wait(0.5) and not self.closing.is_set():
                self._publish()
                self.closing.wait(PUBLISH_S)

    def _publish(self) -> None:
        self.changed.clear()
        try:
            locations.upload(self.local, self.location)
        except OSError as exc:  # the store away for a moment: the next change tries again
            log.warning("stage log %s not stored: %s", self.location, exc)
            self.changed.set()

    def close(self) -> None:
        self.closing.set()
        self.thread.join()
        self._publish()  # the end, whatever happened before


def _writer(file: TextIO, after: Callable[[], None]) -> Say:
    def say(line: str) -> None:
        file.write(f"{time.strftime('%H:%M:%S')} {line}\n")
        file.flush()
        after()

    return say
