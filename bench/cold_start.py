"""What a job costs when no warm group can take it: a new worker group started for it.

    .venv/bin/python bench/cold_start.py [--runs 5]

Starts one `aetrain up` (bench/stack.py) that keeps no group warm (AETRAIN_WARM_GROUPS=0)
and lets an idle one go after 5 s, runs a throwaway job, then `--runs` times: waits until
the last job's group is gone, submits the digits example for 1 epoch, and waits for it.
Printed per job, medians (min-max):

  first epoch   submit -> the first entry of the job's metrics stream (a new group's start,
                then one epoch)
  machine CPU-s all the machine's busy CPU time from the submit to `succeeded` (/proc/stat;
                run it on an otherwise idle machine)
  by process    CPU-s of the group's processes at `succeeded`, by role: Ray Train's
                controller, the rank, Ray Train's SynchronizationActor and the group's
                driver (forked by the dispatcher's launcher)

The job runs the same code a warm group would; only the group's start differs. Nothing is
asserted.
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

from overhead import load_example  # noqa: E402
from stack import Stack, running_stack  # noqa: E402

from shared.redis_keys import Keys  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")
ROLES = {
    "controller": b"ray::TrainController",
    "rank": b"ray::RayTrainWorker",
    "sync actor": b"ray::SynchronizationActor",
}


def busy_cpu_s() -> float:
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(f) for f in fields[:7])
    return (user + nice + system + irq + softirq) / TICKS


def processes() -> dict[int, tuple[bytes, int, float]]:
    """pid -> (cmdline, parent pid, CPU-s) of every process now."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        found[int(entry.name)] = (cmdline, int(stat[1]), (int(stat[11]) + int(stat[12])) / TICKS)
    return found


def cpu_by_role(before: set[int]) -> dict[str, float]:
    """CPU-s of the processes started since `before` was taken, by role."""
    now = processes()
    launchers = {pid for pid, (cmd, _, _) in now.items() if b"workers.group_launcher" in cmd}
    spent = dict.fromkeys([*ROLES, "driver"], 0.0)
    for pid, (cmdline, parent, cpu) in now.items():
        if pid in before:
            continue
        if parent in launchers:
            spent["driver"] += cpu
        for role, marker in ROLES.items():
            if cmdline.startswith(marker):
                spent[role] += cpu
    return spent


def wait_until_no_group(timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not any(b"ray::RayTrainWorker" in cmd for cmd, _, _ in processes().values()):
            return
        time.sleep(0.5)
    raise TimeoutError("the last job's group did not go")


def one_job(stack: Stack, spec: dict[str, object]) -> dict[str, float]:
    wait_until_no_group()
    time.sleep(3.0)  # the retired group's processes have ended; the machine is quiet
    before = set(processes())
    cpu_at_start = busy_cpu_s()
    job_id, posted_at = stack.submit(spec)
    stack.wait(job_id, poll_s=0.05)
    spent = busy_cpu_s() - cpu_at_start
    roles = cpu_by_role(before)
    first_entry = stack.store.redis.xrange(Keys().metrics(job_id), count=1)[0]
    first_epoch = int(first_entry[0].split("-")[0]) / 1000 - posted_at
    return {"first epoch (s)": first_epoch, "machine CPU-s": spent, **roles}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    spec = load_example("digits-dense.yaml")
    spec["training"]["epochs"] = 1
    env = {"AETRAIN_WARM_GROUPS": "0", "AETRAIN_WARM_IDLE_S": "5"}
    with running_stack(env=env) as stack:
        stack.submit_and_wait(spec)  # the throwaway: the launcher and Ray's first actors
        rows = []
        for run in range(args.runs):
            rows.append(one_job(stack, spec))
            print(f"run {run + 1}: " + ", ".join(f"{k} {v:.2f}" for k, v in rows[-1].items()),
                  flush=True)  # fmt: skip
    print(f"\na job on a new 1-worker group, {args.runs} runs, median (min-max):")
    for key in rows[0]:
        values = [row[key] for row in rows]
        print(f"  {key:16s} {statistics.median(values):6.2f} ({min(values):.2f}-{max(values):.2f})")


if __name__ == "__main__":
    main()
