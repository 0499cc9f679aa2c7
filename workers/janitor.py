"""The janitor: lets go of storage and Redis state that nothing will read again.

The dispatcher calls `sweep` every few minutes (`SWEEP_INTERVAL_S`); tests call it directly.
One sweep removes
    *.part files older than an hour     uploads and atomic writes cut short by a crash
    jobs/<id>/attempt-* of finished jobs that the record does not name (runners that lost
                                        their lease; a failed or cancelled job names none)
    jobs/<id>/ and runs/<id>-*          of jobs whose record is gone (deleted, or expired after
                                        the retention time), once older than the grace period
and prunes each tenant's index (entries of expired records) and quota ledger (charges of jobs
that are gone, or that ended before they started, so they have no files).

Only names that parse as our job ids are judged; anything else under storage is left alone.
The grace period (10 min) keeps a job that is being created, or a record read a moment ago,
from being mistaken for a gone one. If Redis knows no tenant at all (a new or wiped
database), nothing is removed by absence of a record: that would be every file.
"""

import json
import logging
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from shared.jobs import JobState, is_terminal
from shared.locations import Entry
from shared.quotas import Quotas
from shared.storage import LocalStorage, Storage
from shared.store import JobStore

log = logging.getLogger("aetrain.janitor")

SWEEP_INTERVAL_S = 300.0
PART_AGE_S = 3600.0
GRACE_S = 600.0
_JOB_ID = re.compile(r"^j[0-9a-f]{20}$")  # shared.jobs.new_job_id: 12 hex of ms, 8 random
_JOB_ITEM = "job:"
_BATCH = 500


@dataclass
class Sweep:
    """What one sweep removed."""

    part_files: int = 0
    stale_attempts: int = 0
    job_folders: int = 0
    run_folders: int = 0
    index_entries: int = 0
    ledger_entries: int = 0
    bytes_freed: int = 0


def sweep(
    store: JobStore,
    storage: Storage,
    now: float | None = None,
    part_age_s: float = PART_AGE_S,
    grace_s: float = GRACE_S,
) -> Sweep:
    """One pass over storage and Redis; returns the counts of what went."""
    now = time.time() if now is None else now
    done = Sweep()
    _sweep_parts(storage, now - part_age_s, done)
    tenants = store.tenants()
    _sweep_jobs(store, storage, now - grace_s, bool(tenants), done)
    if tenants:
        _sweep_runs(store, storage, now - grace_s, done)
    quotas = Quotas(store.redis, store.keys)
    for tenant in tenants:
        done.index_entries += store.prune_index(tenant)
        done.ledger_entries += _prune_ledger(store, quotas, tenant, now - grace_s)
    return done


def sweep_logged(store: JobStore, storage: Storage) -> Sweep | None:
    """`sweep`, logged; an error is logged, never raised (the dispatcher must keep running)."""
    started = time.monotonic()
    try:
        done = sweep(store, storage)
    except Exception:
        log.exception("janitor: the sweep failed; trying again next time")
        return None
    counts = {name: n for name, n in asdict(done).items() if n}
    log.info("janitor: swept in %.1f s: %s", time.monotonic() - started, counts or "nothing")
    return done


def _sweep_parts(storage: Storage, cutoff: float, done: Sweep) -> None:
    # Object storage has no .part files: a PUT lands whole or not at all.
    if not isinstance(storage, LocalStorage) or not storage.root.is_dir():
        return
    for parent, _, files in os.walk(storage.root):  # links to folders are not entered
        for name in files:
            if name.endswith(".part"):
                path = Path(parent) / name
                if _older(path, cutoff):
                    relative = path.relative_to(storage.root).as_posix()
                    if _remove(storage, relative, done):
                        done.part_files += 1


def _sweep_jobs(
    store: JobStore, storage: Storage, cutoff: float, trust_absence: bool, done: Sweep
) -> None:
    folders = [e for e in storage.entries("jobs") if _JOB_ID.match(e.name) and e.is_dir]
    for batch in _batches(folders):
        records = _records(store, [e.name for e in batch])
        for folder, record in zip(batch, records, strict=True):
            job_folder = f"jobs/{folder.name}"
            if record is None:
                old = _age(folder, folder.name) < cutoff
                if trust_absence and old and _remove(storage, job_folder, done):
                    done.job_folders += 1
            elif is_terminal(JobState(record["state"])):
                named = (record.get("result") or {}).get("folder")
                for attempt in storage.entries(job_folder):
                    if not attempt.name.startswith("attempt-"):
                        continue
                    stale = f"{job_folder}/{attempt.name}" != named
                    if stale and _remove(storage, f"{job_folder}/{attempt.name}", done):
                        done.stale_attempts += 1


def _sweep_runs(store: JobStore, storage: Storage, cutoff: float, done: Sweep) -> None:
    by_job: dict[str, list[Entry]] = {}
    for entry in storage.entries("runs"):
        job_id = entry.name.split("-", 1)[0]
        if "-" in entry.name and _JOB_ID.match(job_id):
            by_job.setdefault(job_id, []).append(entry)
    for batch in _batches(sorted(by_job)):
        for job_id, record in zip(batch, _records(store, batch), strict=True):
            if record is not None:
                continue
            for entry in by_job[job_id]:
                if _age(entry, job_id) < cutoff and _remove(storage, f"runs/{entry.name}", done):
                    done.run_folders += 1


def _prune_ledger(store: JobStore, quotas: Quotas, tenant: str, cutoff: float) -> int:
    """Drop the charges of jobs that are gone, or that ended before they ever started."""
    job_ids = [item[len(_JOB_ITEM):] for item in quotas.ledger(tenant)
               if item.startswith(_JOB_ITEM)]  # fmt: skip
    drop: list[str] = []
    for batch in _batches(job_ids):
        for job_id, record in zip(batch, _records(store, batch), strict=True):
            if record is None:
                # The API charges a job just before it stores the record: a young id may be
                # one being submitted right now.
                if _id_time(job_id) < cutoff:
                    drop.append(job_id)
            elif is_terminal(JobState(record["state"])) and record.get("started_at") is None:
                drop.append(job_id)  # cancelled while queued: it never wrote a file
    return quotas.release(tenant, *(_JOB_ITEM + job_id for job_id in drop))


def _remove(storage: Storage, relative: str, done: Sweep) -> bool:
    """Remove one leftover; a failure is logged and the sweep goes on with the next."""
    try:
        done.bytes_freed += storage.remove_at(relative)
    except (OSError, ValueError) as exc:  # ValueError: a link that leads out of the root
        log.warning("janitor: could not remove %s: %s", relative, exc)
        return False
    return True


def _records(store: JobStore, job_ids: list[str]) -> list[dict[str, Any] | None]:
    """The stored records (as JSON documents) of some jobs; None where there is none."""
    if not job_ids:
        return []
    raw = store.redis.mget([store.keys.job(job_id) for job_id in job_ids])
    return [None if r is None else json.loads(r) for r in raw]


def _batches(items: list[Any]) -> list[list[Any]]:
    return [items[i : i + _BATCH] for i in range(0, len(items), _BATCH)]


def _age(entry: Entry, job_id: str) -> float:
    """When a job's folder was last changed; on object storage, whose folders have no time,
    when its job was made (its id says): a folder is never younger than its job."""
    return entry.mtime or _id_time(job_id)


def _older(path: Path, cutoff: float) -> bool:
    try:
        return path.lstat().st_mtime < cutoff
    except FileNotFoundError:
        return False


def _id_time(job_id: str) -> float:
    """When a job id was made (0 for ids of another shape: old enough to judge)."""
    if not _JOB_ID.match(job_id):
        return 0.0
    return int(job_id[1:13], 16) / 1000
