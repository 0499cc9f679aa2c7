"""/v1/datasets: upload a dataset (.npy or .npz, raw bytes or a multipart form), list, describe
and delete uploads."""

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel

from service.deps import StorageDep, StoreDep, TenantDep
from service.upload_form import (
    DATASET_NAME,
    FORM_OVERHEAD_BYTES,
    MAX_NAME_CHARS,
    form_boundary,
    receive_form,
)
from service.uploads import ReceivedFile, receive, store_upload
from shared.datasets import DatasetFacts, DatasetInfo, dataset_id
from shared.errors import DatasetInvalid, QuotaExceeded, UploadTooLarge
from shared.quotas import Quotas, dataset_bytes, dataset_item, quotas_of
from shared.specs import BUILTIN_DATASETS
from shared.storage import Storage
from shared.store import JobStore

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])

_BINARY = {"type": "string", "format": "binary"}
_FILE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/octet-stream": {"schema": _BINARY},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": _BINARY,
                        "name": {
                            "type": "string",
                            "maxLength": MAX_NAME_CHARS,
                            "pattern": DATASET_NAME.pattern,
                        },
                    },
                    "required": ["file"],
                }
            },
        },
    }
}


class DatasetList(BaseModel):
    items: list[DatasetInfo]
    builtin: list[str]


@router.post("", status_code=status.HTTP_201_CREATED, openapi_extra=_FILE_BODY)
async def upload_dataset(
    request: Request,
    store: StoreDep,
    storage: StorageDep,
    tenant: TenantDep,
    response: Response,
    name: Annotated[str, Query(max_length=MAX_NAME_CHARS, pattern=DATASET_NAME.pattern)] = "",
) -> DatasetInfo:
    """Upload an .npy (x) or .npz (x, optional integer labels y): the raw request body, or a
    multipart/form-data form with one file part and optionally a `name` field.

    The same bytes give the same id (200 the second time), whichever way they came; bytes
    already stored, by anyone, are indexed without being parsed again. x may be (n, features),
    or images (n, h, w) / (n, c, h, w) for the conv architecture; it is stored as float32, and
    AETRAIN_MAX_DATASET_BYTES caps x as float32 plus y as int64 (422 naming the array).
    """
    settings = request.app.state.settings
    content_type = request.headers.get("content-type", "")
    # A form's file may take the whole cap: its boundaries and part headers come on top.
    is_form = content_type.lower().startswith("multipart/")
    boundary = form_boundary(content_type) if is_form else None
    body_cap = settings.max_upload_bytes + (FORM_OVERHEAD_BYTES if boundary else 0)
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > body_cap:
        raise UploadTooLarge(settings.max_upload_bytes)
    quotas = quotas_of(store, settings)
    quotas.require_free_disk(storage.free_bytes(), "the upload")
    if boundary is None:
        received = await receive(request.stream(), storage.incoming, settings.max_upload_bytes)
    else:
        form = await receive_form(request.stream(), boundary, storage.incoming,
                                  settings.max_upload_bytes)  # fmt: skip
        received = form.file
        if form.name and name and form.name != name:
            received.path.unlink(missing_ok=True)
            raise DatasetInvalid("name", "given twice, as a query parameter and a form field, "
                                 "with different values")  # fmt: skip
        name = name or form.name
    try:
        info, created = await run_in_threadpool(
            _store_upload, store, storage, quotas, tenant, received, name,
            settings.max_dataset_bytes,
        )  # fmt: skip
    finally:
        received.path.unlink(missing_ok=True)
    if not created:
        response.status_code = status.HTTP_200_OK
    return info


def _store_upload(
    store: JobStore,
    storage: Storage,
    quotas: Quotas,
    tenant: str,
    received: ReceivedFile,
    name: str,
    max_bytes: int,
) -> tuple[DatasetInfo, bool]:
    """Index the upload for the tenant and charge it to the tenant's quota; parse and store it
    only if these bytes are new."""
    stored_id = dataset_id(received.sha256)
    facts = storage.stored_facts(stored_id)
    new = facts is None
    if facts is None:
        facts = _parse_and_store(storage, received, stored_id, max_bytes)
    item = dataset_item(stored_id)
    stored_bytes = dataset_bytes(facts.shape, labeled=facts.label_counts is not None)
    try:
        charged = quotas.charge(tenant, item, stored_bytes, f"dataset {name or stored_id!r}")
    except QuotaExceeded:
        if new and not store.datasets.owners(stored_id):  # nobody else kept these bytes
            storage.delete_dataset_files(stored_id)
        raise
    try:
        indexed = store.datasets.add(tenant, facts.describe(name or "upload", datetime.now(UTC)))
    except BaseException:
        if charged:
            quotas.release(tenant, item)
        raise
    if storage.stored_facts(stored_id) is None:  # its last other owner deleted it meanwhile
        _parse_and_store(storage, received, stored_id, max_bytes)
    return indexed


def _parse_and_store(
    storage: Storage, received: ReceivedFile, stored_id: str, max_bytes: int
) -> DatasetFacts:
    # store_upload writes the staged file whole or not at all; keep_dataset lets go of it.
    staged = storage.dataset_staging(stored_id)
    facts = store_upload(received, staged, max_bytes)
    storage.keep_dataset(facts, staged)  # the .npz, then the facts: they vouch for it
    return facts


@router.get("")
def list_datasets(store: StoreDep, tenant: TenantDep) -> DatasetList:
    """The caller's uploads, newest first, and the names of the built-in datasets."""
    return DatasetList(items=store.datasets.list(tenant), builtin=sorted(BUILTIN_DATASETS))


@router.get("/{dataset_id}")
def get_dataset(dataset_id: str, store: StoreDep, tenant: TenantDep) -> DatasetInfo:
    """Shape, dtype and label counts of one upload."""
    return store.datasets.get(tenant, dataset_id)


@router.delete("/{dataset_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_dataset(
    dataset_id: str, store: StoreDep, storage: StorageDep, tenant: TenantDep
) -> None:
    """Delete one of the caller's uploads; 409 while a queued or running job of the caller uses
    it. The file goes with the last tenant whose index names these bytes."""
    last = store.datasets.delete(tenant, dataset_id)
    Quotas(store.redis, store.keys).release(tenant, dataset_item(dataset_id))
    if last:
        storage.delete_dataset_files(dataset_id)
