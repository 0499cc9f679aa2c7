"""Child processes that do not outlive their parent."""

import contextlib
import ctypes
import signal

_PR_SET_PDEATHSIG = 1


def die_with_parent(signum: int = signal.SIGKILL) -> None:
    """In a child (preexec_fn): receive `signum` when the parent dies. Linux only.

    A dead dispatcher then leaves no live run behind that a second runner would duplicate,
    and a killed `aetrain up` takes its children with it.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signum)
