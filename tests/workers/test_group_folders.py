"""A group's local folder (config, log, Ray Train's run folder) outlives a dispatcher killed
outright; the next pool to start on the host removes it, and only it."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from workers.group_pool import OWNER_FILE, owner_line, sweep_orphaned_group_folders

pytestmark = pytest.mark.timeout(60)


def group_folder(root: Path, name: str, owner: str | None) -> Path:
    folder = root / f"aetrain-group-{name}"
    (folder / "ray").mkdir(parents=True)
    (folder / "group.log").write_text("a line\n")
    if owner is not None:
        (folder / OWNER_FILE).write_text(owner)
    return folder


def test_the_folders_of_dispatchers_that_are_gone_are_removed_and_no_others(
    tmp_path: Path,
) -> None:
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)  # fmt: skip
    dead_pid = int(ended.stdout)
    host = socket.gethostname()
    mine = owner_line()
    assert mine.split()[:2] == [host, str(os.getpid())]
    _, pid, started = mine.split()

    killed = group_folder(tmp_path, "killed", f"{host} {dead_pid} 1")
    reused = group_folder(tmp_path, "reused", f"{host} {pid} {int(started) - 1}")  # pid reused
    alive = group_folder(tmp_path, "alive", mine)
    elsewhere = group_folder(tmp_path, "elsewhere", f"another-host {dead_pid} 1")
    unowned = group_folder(tmp_path, "unowned", None)
    unrelated = tmp_path / "not-a-group"
    unrelated.mkdir()
    (unrelated / OWNER_FILE).write_text(f"{host} {dead_pid} 1")

    removed = sweep_orphaned_group_folders(tmp_path)

    assert sorted(removed) == sorted([killed, reused])
    assert not killed.exists() and not reused.exists()
    assert alive.is_dir() and elsewhere.is_dir() and unowned.is_dir() and unrelated.is_dir()
    assert sweep_orphaned_group_folders(tmp_path) == []
