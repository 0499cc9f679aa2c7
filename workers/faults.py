"""Fault-injection points, for the tests and bench/chaos.py that kill a dispatcher at them.

`AETRAIN_FAULT_PAUSE=point:seconds` makes the dispatcher sleep at `point` (after logging that
it got there), so that a test can SIGKILL it exactly there. `AETRAIN_FAULT_RESTART_DELAY_S`
makes `aetrain up` wait that long before it starts a dead child again, so that a test can
observe the outage on purpose rather than hope to catch it. Unset, as in every deployment,
each point costs one dictionary lookup.
"""

import logging
import os
import time

log = logging.getLogger("aetrain.faults")

POINTS = ("claimed", "finalizing")  # after the claim, before any stage; after the last stage


def pause_at(point: str, job_id: str) -> None:
    setting = os.environ.get("AETRAIN_FAULT_PAUSE", "")
    name, _, seconds = setting.partition(":")
    if name == point:
        log.warning("job %s: paused at fault point %r for %s s", job_id, point, seconds)
        time.sleep(float(seconds or 60))


def restart_delay_s() -> float:
    """How long `aetrain up` waits before starting a dead child again (0 unless a test says)."""
    return float(os.environ.get("AETRAIN_FAULT_RESTART_DELAY_S", "0") or 0)
