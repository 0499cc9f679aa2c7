"""What a runner holds of a job while it runs it, and the order in which jobs start."""

from dataclasses import dataclass

from shared.jobs import JobRecord


@dataclass(frozen=True)
class Claim:
    """A job this runner now holds: its record and fencing token."""

    job: JobRecord
    token: int


def queue_score(job: JobRecord) -> int:
    """Lower starts first: higher priority first; ties go by job id, which sorts by time."""
    return -job.spec.priority
