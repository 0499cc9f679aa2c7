"""The group launcher forks warm groups' drivers; what the pool relies on, without Ray: the
return code of a driver that failed and its traceback in its log, a kill, and that drivers end
with their launcher (and so with their dispatcher)."""

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from workers.group_launcher import GroupLauncher

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def launcher() -> Iterator[GroupLauncher]:
    launcher = GroupLauncher()
    launcher.start()
    yield launcher
    launcher.close()


def blocked_config(tmp_path: Path) -> Path:
    """A config that is a FIFO nobody writes to: the driver blocks reading it, alive."""
    path = tmp_path / "config.json"
    os.mkfifo(path)
    return path


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_driver_that_fails_reports_its_code_and_leaves_its_traceback_in_its_log(
    launcher: GroupLauncher, tmp_path: Path
) -> None:
    (tmp_path / "config.json").write_text("{not json")
    driver = launcher.launch(tmp_path / "config.json", tmp_path / "group.log")
    assert driver.wait(timeout=30) == 1
    assert driver.poll() == 1
    log = (tmp_path / "group.log").read_text()
    assert "Traceback" in log and "GroupConfig" in log, log


def test_the_launcher_forks_its_drivers_and_its_forks_draw_their_own_ray_ids(
    launcher: GroupLauncher,
) -> None:
    assert launcher._ready.wait(60)
    assert launcher.forks_in_place is True


FORKED_IDS = """
import importlib
from workers.group_launcher import PRELOAD, _forked_ids_differ

for module in PRELOAD:
    importlib.import_module(module)
print(_forked_ids_differ())
import ray.train  # declares Ray actors at import: that seeds the generator a fork copies
print(_forked_ids_differ())
"""


def test_the_fork_probe_tells_a_seeded_ray_generator_from_an_unseeded_one() -> None:
    """Forks of a process that imported Ray Train draw the same "random" Ray ids (two drivers
    forked from it failed their start on one plasma object id); the launcher imports only
    what leaves them distinct, and the probe that checks it sees the difference."""
    done = subprocess.run([sys.executable, "-c", FORKED_IDS], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).parents[2])  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["True", "False"]


def test_where_forks_would_share_ray_ids_each_driver_starts_as_a_new_process(
    tmp_path: Path,
) -> None:
    seeded = ("import workers.group_launcher as launcher; "
              "launcher.PRELOAD += ('ray.train',); launcher.serve()")  # fmt: skip
    launcher = GroupLauncher(command=[sys.executable, "-c", seeded])
    try:
        (tmp_path / "config.json").write_text("{not json")
        driver = launcher.launch(tmp_path / "config.json", tmp_path / "group.log")
        assert launcher.forks_in_place is False
        assert driver.wait(timeout=60) == 1
        log = (tmp_path / "group.log").read_text()
        # Run as `python -m workers.warm_group` (runpy), not in the launcher's forked code.
        assert "runpy" in log and "group_launcher.py" not in log and "GroupConfig" in log, log
    finally:
        launcher.close()


def test_a_killed_driver_is_gone_and_reported_killed(
    launcher: GroupLauncher, tmp_path: Path
) -> None:
    driver = launcher.launch(blocked_config(tmp_path), tmp_path / "group.log")
    time.sleep(0.5)
    assert driver.poll() is None and alive(driver.pid)
    driver.kill()
    assert driver.wait(timeout=10) == -signal.SIGKILL
    assert not alive(driver.pid)
    driver.kill()  # a second kill of an ended driver is harmless


PARENT = """
import sys, time
from pathlib import Path
from workers.group_launcher import GroupLauncher

launcher = GroupLauncher()
folder = Path(sys.argv[1])
driver = launcher.launch(folder / "config.json", folder / "group.log")
print(launcher._process.pid, driver.pid, flush=True)
time.sleep(600)
"""


def test_drivers_end_with_the_dispatcher_that_launched_them(tmp_path: Path) -> None:
    """A dispatcher killed outright (SIGKILL): its launcher sees its stdin close and ends,
    and the drivers get their parent-death signal: no Ray job of a dead dispatcher lives on."""
    blocked_config(tmp_path)
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(tmp_path)],
                              stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).parents[2])  # fmt: skip
    assert parent.stdout is not None
    launcher_pid, driver_pid = (int(pid) for pid in parent.stdout.readline().split())
    assert alive(launcher_pid) and alive(driver_pid)
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 20
    while (alive(launcher_pid) or alive(driver_pid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(launcher_pid) and not alive(driver_pid)


def test_a_launcher_started_by_a_thread_that_ends_lives_on(tmp_path: Path) -> None:
    """A stage's thread may be the first to need the launcher, and it ends with the stage;
    the launcher's parent-death signal follows the thread that started it (a launcher
    started by a stage's thread took every group down with it as the stage ended)."""
    launcher = GroupLauncher()

    def start_and_wait_until_ready() -> None:
        launcher.start()
        launcher._ready.wait(60)

    starter = threading.Thread(target=start_and_wait_until_ready)
    starter.start()
    starter.join()
    try:
        launcher_pid = launcher.pid
        assert launcher_pid is not None
        time.sleep(0.5)  # a parent-death signal would have come by now
        assert alive(launcher_pid)
        (tmp_path / "config.json").write_text("{not json")
        driver = launcher.launch(tmp_path / "config.json", tmp_path / "group.log")
        assert driver.wait(timeout=30) == 1
        assert launcher.pid == launcher_pid  # the same launcher, not one started again
    finally:
        launcher.close()
