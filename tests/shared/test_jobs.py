"""Job and stage lifecycles: every legal change is in TRANSITIONS, everything else is refused."""

import inspect
import itertools
import pickle
import time

import pytest

import shared.errors
from shared.errors import (
    ArtifactNotFound,
    BodyTooLarge,
    DatasetInUse,
    DatasetInvalid,
    DatasetNotFound,
    ForeignOrigin,
    IdempotencyConflict,
    InvalidTransition,
    JobNotFound,
    LeaseLost,
    QuotaExceeded,
    RateLimited,
    ResultNotReady,
    TooManyJobs,
    TooManyStreams,
    TrainingFailed,
    TrainServiceError,
    Unauthenticated,
    UploadTooLarge,
)
from shared.jobs import (
    STAGE_TRANSITIONS,
    TRANSITIONS,
    JobRecord,
    JobState,
    StageRecord,
    StageState,
    advance,
    is_terminal,
    new_job_id,
)
from shared.specs import parse_job_spec
from tests.specs import digits_spec

TERMINAL = [JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED]


def new_job() -> JobRecord:
    return JobRecord.for_spec(parse_job_spec(digits_spec()))


def job_in(state: JobState) -> JobRecord:
    return new_job().model_copy(update={"state": state})


def test_a_new_record_is_queued_with_its_stages_pending() -> None:
    job = new_job()
    assert job.state is JobState.QUEUED
    assert job.kind == "autoencoder" and job.name == "digits-dense" and job.tenant == "default"
    assert [(s.name, s.state) for s in job.stages] == [("train", StageState.PENDING)]
    assert job.started_at is None and job.finished_at is None and job.attempts == 0


@pytest.mark.parametrize(("current", "target"), list(itertools.product(JobState, JobState)))
def test_advance_succeeds_exactly_for_the_listed_transitions(
    current: JobState, target: JobState
) -> None:
    job = job_in(current)
    if target in TRANSITIONS[current]:
        moved = advance(job, target)
        assert moved.state is target
        assert job.state is current  # the record is a value: the original is unchanged
    else:
        with pytest.raises(InvalidTransition) as info:
            advance(job, target)
        assert (info.value.job_id, info.value.current, info.value.target) == (
            job.id,
            current,
            target,
        )


def test_the_transition_table_is_the_documented_lifecycle() -> None:
    assert TRANSITIONS == {
        JobState.QUEUED: {JobState.RUNNING, JobState.CANCELLED},
        JobState.RUNNING: {
            JobState.QUEUED,
            JobState.SUCCEEDED,
            JobState.FAILED,
            JobState.CANCELLED,
        },
        JobState.SUCCEEDED: set(),
        JobState.FAILED: set(),
        JobState.CANCELLED: set(),
    }


@pytest.mark.parametrize("state", list(JobState))
def test_terminal_states_have_no_exits(state: JobState) -> None:
    assert is_terminal(state) is (state in TERMINAL)
    assert (not TRANSITIONS[state]) is (state in TERMINAL)


@pytest.mark.parametrize("state", list(StageState))
def test_terminal_stage_states_have_no_exits(state: StageState) -> None:
    terminal = state not in (StageState.PENDING, StageState.RUNNING)
    assert (not STAGE_TRANSITIONS[state]) is terminal


def test_running_sets_started_at_and_not_finished_at() -> None:
    running = advance(new_job(), JobState.RUNNING)
    assert running.started_at is not None
    assert running.finished_at is None
    assert running.started_at >= running.created_at


def test_a_second_run_keeps_the_first_started_at() -> None:
    first = advance(new_job(), JobState.RUNNING)
    again = advance(advance(first, JobState.QUEUED), JobState.RUNNING)
    assert again.started_at == first.started_at
    assert again.finished_at is None


@pytest.mark.parametrize("final", TERMINAL)
def test_finishing_sets_finished_at_and_keeps_started_at(final: JobState) -> None:
    running = advance(new_job(), JobState.RUNNING)
    done = advance(running, final, error="boom" if final is JobState.FAILED else None)
    assert done.finished_at is not None and running.started_at is not None
    assert done.finished_at >= running.started_at
    assert done.started_at == running.started_at
    if final is JobState.FAILED:
        assert done.error == "boom"


def test_cancelling_a_queued_job_finishes_it_without_a_start() -> None:
    cancelled = advance(new_job(), JobState.CANCELLED)
    assert cancelled.finished_at is not None
    assert cancelled.started_at is None


def test_going_back_to_queued_does_not_finish() -> None:
    back = advance(advance(new_job(), JobState.RUNNING), JobState.QUEUED)
    assert back.state is JobState.QUEUED and back.finished_at is None


def test_advance_applies_the_extra_changes() -> None:
    running = advance(new_job(), JobState.RUNNING, attempts=3, warnings=["w"])
    assert running.attempts == 3 and running.warnings == ["w"]


@pytest.mark.parametrize(("current", "target"), list(itertools.product(StageState, StageState)))
def test_with_stage_succeeds_exactly_for_the_listed_stage_transitions(
    current: StageState, target: StageState
) -> None:
    job = new_job().model_copy(update={"stages": [StageRecord(name="train", state=current)]})
    if target in STAGE_TRANSITIONS[current]:
        moved = job.with_stage("train", target)
        assert moved.stages[0].state is target
        assert job.stages[0].state is current
    else:
        with pytest.raises(InvalidTransition):
            job.with_stage("train", target)


def test_stage_timestamps_follow_its_transitions() -> None:
    job = new_job()
    running = job.with_stage("train", StageState.RUNNING)
    stage = running.stages[0]
    assert stage.state is StageState.RUNNING
    assert stage.started_at is not None and stage.finished_at is None

    given_back = running.with_stage("train", StageState.PENDING)
    assert given_back.stages[0].finished_at is None
    assert given_back.stages[0].started_at == stage.started_at

    done = running.with_stage("train", StageState.SUCCEEDED)
    assert done.stages[0].finished_at is not None
    assert done.stages[0].finished_at >= stage.started_at
    assert done.stages[0].started_at == stage.started_at


def test_with_stage_changes_only_the_named_stage() -> None:
    job = new_job().model_copy(update={"stages": [StageRecord(name="a"), StageRecord(name="b")]})
    moved = job.with_stage("b", StageState.RUNNING)
    assert [(s.name, s.state) for s in moved.stages] == [
        ("a", StageState.PENDING),
        ("b", StageState.RUNNING),
    ]
    assert moved.state is job.state


@pytest.mark.parametrize(
    ("final", "running_becomes"),
    [
        (JobState.SUCCEEDED, StageState.SUCCEEDED),
        (JobState.FAILED, StageState.FAILED),
        (JobState.CANCELLED, StageState.CANCELLED),
    ],
)
def test_a_terminal_advance_closes_every_open_stage(
    final: JobState, running_becomes: StageState
) -> None:
    job = new_job().model_copy(
        update={
            "stages": [
                StageRecord(name="done", state=StageState.PENDING),
                StageRecord(name="running", state=StageState.PENDING),
                StageRecord(name="later", state=StageState.PENDING),
            ]
        }
    )
    job = advance(job, JobState.RUNNING)
    job = job.with_stage("done", StageState.RUNNING).with_stage("done", StageState.SUCCEEDED)
    done_stage = job.stages[0]
    job = job.with_stage("running", StageState.RUNNING)

    closed = advance(job, final)
    by_name = {s.name: s for s in closed.stages}
    assert by_name["done"] == done_stage  # already closed: untouched
    assert by_name["running"].state is running_becomes
    assert by_name["later"].state is StageState.SKIPPED
    for name in ("running", "later"):
        assert by_name[name].finished_at == closed.finished_at
    assert by_name["running"].started_at == job.stages[1].started_at
    assert by_name["later"].started_at is None


def test_cancelling_a_queued_job_skips_its_stages() -> None:
    cancelled = advance(new_job(), JobState.CANCELLED)
    assert [s.state for s in cancelled.stages] == [StageState.SKIPPED]


def test_records_are_frozen() -> None:
    job = new_job()
    with pytest.raises(Exception) as info:
        job.state = JobState.RUNNING  # type: ignore[misc]
    assert "frozen" in str(info.value).lower()
    assert job.state is JobState.QUEUED


ERRORS: list[TrainServiceError] = [
    TrainServiceError("something went wrong"),
    JobNotFound("j0001"),
    InvalidTransition("j0001", JobState.SUCCEEDED, JobState.CANCELLED),
    InvalidTransition("j0001/train", StageState.PENDING, StageState.SUCCEEDED),
    LeaseLost("j0001", 7),
    ResultNotReady("j0001", JobState.RUNNING),
    ResultNotReady("j0001", JobState.FAILED, "out of memory"),
    ArtifactNotFound("j0001", "../x"),
    IdempotencyConflict("key-1"),
    TrainingFailed("worker 1 died: CUDA error"),
    DatasetNotFound("ds-0123"),
    DatasetInvalid("x", "3 values are NaN"),
    UploadTooLarge(1024),
    Unauthenticated(),
    TooManyJobs("acme", 100),
    RateLimited("acme", 600, retry_after_s=17),
    BodyTooLarge(2**20),
    ForeignOrigin("Host 'rebind.evil.example'"),
    TooManyStreams("acme", 16),
    QuotaExceeded("job j0001", 5_000_000_000, 1_000),
    DatasetInUse("ds-0123", ["j0001", "j0002"]),
]


@pytest.mark.parametrize("error", ERRORS, ids=lambda e: type(e).__name__)
def test_every_error_survives_pickling(error: TrainServiceError) -> None:
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert str(copy) == str(error)
    assert copy.args == error.args
    assert vars(copy) == vars(error)


def test_the_pickling_cases_cover_every_error_class() -> None:
    classes = {
        cls
        for _, cls in inspect.getmembers(shared.errors, inspect.isclass)
        if issubclass(cls, TrainServiceError)
    }
    assert classes == {type(e) for e in ERRORS}


def test_error_messages_name_what_went_wrong() -> None:
    assert str(InvalidTransition("j1", JobState.SUCCEEDED, JobState.CANCELLED)) == (
        "job 'j1' is succeeded; it cannot become cancelled"
    )
    assert "out of memory" in str(ResultNotReady("j1", JobState.FAILED, "out of memory"))
    assert "error" not in str(ResultNotReady("j1", JobState.RUNNING))
    assert "7" in str(LeaseLost("j1", 7))


def test_job_ids_sort_by_creation_time() -> None:
    ids = []
    for _ in range(5):
        ids.append(new_job_id())
        time.sleep(0.002)  # ids resolve milliseconds
    assert sorted(ids) == ids
    assert len(set(ids)) == len(ids)
    assert all(i.startswith("j") and len(i) == 21 for i in ids)


def test_record_ids_sort_like_their_created_at() -> None:
    jobs = []
    for _ in range(4):
        jobs.append(new_job())
        time.sleep(0.002)
    assert sorted(jobs, key=lambda j: j.id) == sorted(jobs, key=lambda j: j.created_at)


def test_ids_made_in_one_millisecond_are_distinct() -> None:
    ids = [new_job_id() for _ in range(200)]
    assert len(set(ids)) == len(ids)
