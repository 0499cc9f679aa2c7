"""`python -m workers` (or `aetrain worker`): one dispatcher process."""

from workers.main import run_worker

if __name__ == "__main__":
    run_worker()
