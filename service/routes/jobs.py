"""/v1/jobs: submit, list, read, cancel, delete; results, artifacts and the encoder."""

import logging
from pathlib import PurePosixPath
from typing import Annotated, Any, Literal
from urllib.parse import quote

from fastapi import APIRouter, Header, Query, Request, Response, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service.deps import CallerDep, JobReadsDep, StorageDep, StoreDep, TenantDep
from service.responses import model_response
from shared import locations
from shared.errors import ArtifactNotFound, DatasetNotFound, InvalidTransition, ResultNotReady
from shared.jobs import JobRecord, JobState
from shared.quotas import job_item, quotas_of, submit_within_quota
from shared.specs import BUILTIN_DATASETS, AnyJobSpec, JobSpec, parse_job_spec
from shared.storage import ENCODER_FILES
from shared.store import JobStore

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
log = logging.getLogger("aetrain.api")


class JobPage(BaseModel):
    items: list[JobRecord]
    next_cursor: str | None


class JobResult(BaseModel):
    job_id: str
    metrics: dict[str, Any]
    artifacts: list[str]


@router.post("", status_code=status.HTTP_201_CREATED, response_model=JobRecord)
def submit_job(
    spec: JobSpec,
    request: Request,
    store: StoreDep,
    storage: StorageDep,
    caller: CallerDep,
    idempotency_key: Annotated[str | None, Header(min_length=1, max_length=255)] = None,
) -> Response:
    """Validate and enqueue a job; a retried Idempotency-Key returns the first job (200)."""
    tenant = caller.tenant
    if spec.priority > caller.max_priority:
        error = {"loc": ("body", "priority"), "type": "value_error",
                 "msg": f"priority {spec.priority} is above {caller.max_priority}, the most "
                        "this API key allows"}  # fmt: skip
        raise RequestValidationError([error])
    spec = with_upload(spec, store, tenant)
    settings = request.app.state.settings
    job, created = submit_within_quota(
        store, quotas_of(store, settings), JobRecord.for_spec(spec, tenant),
        storage.free_bytes(), idempotency_key, settings.max_open_jobs,
        settings.max_submissions_per_minute,
    )  # fmt: skip
    return model_response(job, status.HTTP_201_CREATED if created else status.HTTP_200_OK)


def with_upload(spec: AnyJobSpec, store: JobStore, tenant: str) -> AnyJobSpec:
    """The spec with what the workers need to know of the uploaded dataset it names.

    Checks that need the dataset's shape (sizes, conv on images, labels) run again here.
    """
    if spec.data.dataset in BUILTIN_DATASETS:
        return spec
    loc = ("body", "data", "dataset")
    try:
        upload = store.datasets.get(tenant, spec.data.dataset).as_upload()
    except DatasetNotFound:
        error = {"loc": loc, "msg": f"no uploaded dataset {spec.data.dataset!r}",
                 "type": "value_error"}  # fmt: skip
        raise RequestValidationError([error]) from None
    document = spec.model_dump(mode="json")
    document["data"]["upload"] = upload.model_dump(mode="json")
    try:
        return parse_job_spec(document)
    except ValidationError as exc:
        raise RequestValidationError(
            [{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]
        ) from None


@router.get("", response_model=JobPage)
def list_jobs(
    store: StoreDep,
    tenant: TenantDep,
    state: JobState | None = None,
    cursor: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> Response:
    """The caller's jobs, newest first; pass `next_cursor` back as `cursor` for the next page."""
    items, next_cursor = store.list_jobs(tenant, state, cursor, limit)
    return model_response(JobPage(items=items, next_cursor=next_cursor))


@router.get("/{job_id}", response_model=JobRecord)
async def get_job(job_id: str, reads: JobReadsDep, tenant: TenantDep) -> Response:
    """The job record with its latest epoch and metrics."""
    return model_response(await reads.get(job_id, tenant))


@router.post("/{job_id}/cancel", response_model=JobRecord)
def cancel_job(job_id: str, store: StoreDep, tenant: TenantDep) -> Response:
    """Cancel a queued job now, or ask a running job's runner to stop it within seconds."""
    return model_response(store.request_cancel(job_id, tenant))


@router.delete("/{job_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_job(
    job_id: str, request: Request, store: StoreDep, storage: StorageDep, tenant: TenantDep
) -> None:
    """Delete a finished job: its record, metrics, artifacts, checkpoints and logs."""
    try:
        job = store.delete(job_id, tenant)
    except InvalidTransition as exc:
        raise InvalidTransition(exc.job_id, exc.current, "deleted; cancel it first") from None
    try:
        storage.delete_job_files(job.id)
    except (OSError, ValueError) as exc:  # the record is gone: the janitor takes what is left
        log.warning("job %s: deleted, but not all of its files: %s", job.id, exc)
    quotas_of(store, request.app.state.settings).release(job.tenant, job_item(job.id))


@router.get("/{job_id}/result")
def get_result(job_id: str, store: StoreDep, tenant: TenantDep) -> JobResult:
    """Final metrics and artifact names; 409 until the job has succeeded."""
    job = store.get(job_id, tenant)
    if job.state is not JobState.SUCCEEDED or job.result is None:
        raise ResultNotReady(job.id, job.state, job.error)
    return JobResult(
        job_id=job.id, metrics=job.result["metrics"], artifacts=job.result["artifacts"]
    )


class InterpolationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    a: int = Field(ge=0, description="index of a validation sample")
    b: int = Field(ge=0, description="index of another validation sample")
    steps: int = Field(default=8, ge=2, le=64)


class Interpolation(BaseModel):
    a: int
    b: int
    codes: list[list[float]]
    outputs: list[list[float]]
    input_shape: list[int]


@router.post("/{job_id}/interpolate", response_model=None)
def interpolate_codes(
    job_id: str,
    request: InterpolationRequest,
    store: StoreDep,
    storage: StorageDep,
    tenant: TenantDep,
    format: Literal["json", "png"] = "json",
) -> Interpolation | Response:
    """Decode `steps` points on the line between the codes of validation samples a and b.

    JSON gives every code and output value, up to 262,144 numbers in all (steps x (code size +
    sample size)); past that it is a 422 on `steps` saying how many steps fit, never a cut
    reply. `format=png` draws any size as at most 16 panels a row, each sample shrunk (images
    to 64x64, long vectors to bands of 128 bins), at most about 1600x400 pixels.
    """
    from workers.interpolation import InterpolationRefused, interpolate, interpolation_png

    job = store.get(job_id, tenant)
    try:
        # 404 unless the job has both files; on object storage, a local copy of the two
        with storage.artifact_files(job, ["val_codes.npy", "autoencoder.safetensors"]) as folder:
            if format == "png":
                png = interpolation_png(job.spec, folder, request.a, request.b, request.steps)
                return Response(png, media_type="image/png")
            codes, outputs = interpolate(job.spec, folder, request.a, request.b, request.steps)
    except InterpolationRefused as exc:
        detail = [{"field": exc.field, "loc": ["body", exc.field], "msg": str(exc),
                   "type": "value_error"}]  # fmt: skip
        return JSONResponse({"detail": detail}, status_code=422)
    return Interpolation(
        a=request.a,
        b=request.b,
        codes=codes.tolist(),
        outputs=outputs.tolist(),
        input_shape=list(job.spec.data.input_shape),
    )


# Set, not guessed: mimetypes takes .pt for a SNES page table and calls the rest text/plain.
_MEDIA_TYPES = {".json": "application/json", ".png": "image/png", ".jsonl": "application/x-ndjson"}
_BINARY = "application/octet-stream"
_FILE_SCHEMA = {"schema": {"type": "string", "format": "binary"}}


def _download(location: str, filename: str, job_id: str) -> Response:
    """The file, streamed: from disk (FileResponse: ranges, sendfile), or from object storage a
    chunk at a time, so a download never holds the whole file in the API's memory."""
    media_type = _MEDIA_TYPES.get(PurePosixPath(filename).suffix, _BINARY)
    if not locations.is_remote(location):
        return FileResponse(location, filename=filename, media_type=media_type)
    size = locations.size_of(location)
    if size is None:  # deleted since it was found
        raise ArtifactNotFound(job_id, filename)
    headers = {"Content-Length": str(size),
               "Content-Disposition": f'attachment; filename="{quote(filename)}"'}  # fmt: skip
    return StreamingResponse(locations.chunks(location), media_type=media_type, headers=headers)


@router.get(
    # `:path`: an event file's name has folders (tensorboard/<stage>/...). Only names in the
    # job's own list are served (Storage.artifact_path), so a `..` in one reaches nothing.
    "/{job_id}/artifacts/{name:path}",
    response_class=FileResponse,
    responses={
        200: {
            "description": "the file: JSON, JSON lines, PNG, or binary (weights, arrays)",
            "content": {
                **dict.fromkeys([*_MEDIA_TYPES.values(), _BINARY], _FILE_SCHEMA),
                "application/json": {"schema": {}},  # result.json, model.json: any JSON
            },
        }
    },
)
def get_artifact(
    job_id: str, name: str, store: StoreDep, storage: StorageDep, tenant: TenantDep
) -> Response:
    """One artifact, by a name from the job's artifact list (some have folders: the
    TensorBoard event files are `tensorboard/<stage>/events.out.tfevents.<stage>`)."""
    location = storage.artifact(store.get(job_id, tenant), name)
    return _download(location, locations.name_of(location), job_id)


class OnnxEncoderMissing(ArtifactNotFound):
    """A job that finished before the workers exported encoder.onnx (a 404, as its base)."""

    def __str__(self) -> str:
        return (
            f"job {self.job_id!r} has no ONNX encoder: it finished before aetrain exported "
            "encoder.onnx. Download format=torchscript or safetensors, or run the job again"
        )


# encoder.onnx is written by the workers (workers/onnx_export.py), so serving it needs no torch.
_ENCODER_FILES = {**ENCODER_FILES, "onnx": "encoder.onnx"}


@router.get(
    "/{job_id}/encoder",
    response_class=FileResponse,
    responses={200: {"description": "the encoder file", "content": {_BINARY: _FILE_SCHEMA}}},
)
def get_encoder(
    job_id: str,
    store: StoreDep,
    storage: StorageDep,
    tenant: TenantDep,
    format: Literal["torchscript", "safetensors", "onnx"] = "torchscript",
) -> Response:
    """The trained encoder: TorchScript (`torch.jit.load`), safetensors weights, or ONNX
    (input `x`: (batch, D) raw features, output `codes`)."""
    job = store.get(job_id, tenant)
    name = _ENCODER_FILES[format]
    try:
        location = storage.artifact(job, name)
    except ArtifactNotFound:
        if format == "onnx" and job.result is not None and name not in job.result["artifacts"]:
            raise OnnxEncoderMissing(job.id, name) from None
        raise
    return _download(location, f"{job_id}-{name}", job_id)
