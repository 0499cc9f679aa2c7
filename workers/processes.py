"""Child processes that do not outlive their parent."""

import contextlib
import ctypes
import os
import signal

_PR_SET_PDEATHSIG = 1
PARENT_ENV = "AETRAIN_DIE_WITH_PARENT"  # "<parent pid>:<signal>", read once by the child


def die_with_parent(signum: int = signal.SIGKILL) -> None:
    """In a child: receive `signum` when the parent dies. Linux only.

    A dead dispatcher then leaves no live run behind that a second runner would duplicate,
    and a killed `aetrain up` takes its children with it.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signum)


def parent_death_env(signum: int = signal.SIGKILL) -> dict[str, str]:
    """What a child started without a preexec_fn needs to arm die_with_parent itself.

    A preexec_fn makes subprocess fork() a process with threads: OpenBLAS's fork handler then
    waits for a BLAS call of another thread that waits for the GIL the forking thread holds,
    and the dispatcher hung (seen in CI). Without a preexec_fn, Python spawns with vfork.
    """
    return {PARENT_ENV: f"{os.getpid()}:{int(signum)}"}


def die_with_parent_from_env() -> None:
    """In the child, first thing: arm the parent-death signal that parent_death_env asked for."""
    value = os.environ.pop(PARENT_ENV, "")
    if not value:
        return
    parent, signum = (int(part) for part in value.split(":"))
    die_with_parent(signum)
    if os.getppid() != parent:  # the parent died before the signal was armed
        os.kill(os.getpid(), signum)
