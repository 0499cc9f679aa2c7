"""FastAPI dependencies: the store and storage built once per app by its lifespan."""

from typing import Annotated

from fastapi import Depends, Request

from shared.storage import Storage
from shared.store import JobStore


def get_store(request: Request) -> JobStore:
    store: JobStore = request.app.state.store
    return store


def get_storage(request: Request) -> Storage:
    storage: Storage = request.app.state.storage
    return storage


def get_tenant(request: Request) -> str:
    """The caller's tenant; one tenant until API keys arrive."""
    return "default"


StoreDep = Annotated[JobStore, Depends(get_store)]
StorageDep = Annotated[Storage, Depends(get_storage)]
TenantDep = Annotated[str, Depends(get_tenant)]
