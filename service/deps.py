"""FastAPI dependencies: the store and storage built once per app by its lifespan; the tenant.

They are `async def` because they do no I/O (or hand what little they do to a thread
themselves): FastAPI runs a sync dependency on a thread of its pool, one hop per dependency
per request, and those hops were a fifth of the API's CPU under load (docs/benchmarks.md).
"""

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from service.job_reads import JobReads
from shared.apikey_store import Caller
from shared.errors import Unauthenticated
from shared.settings import Settings
from shared.storage import Storage
from shared.store import JobStore

DEFAULT_TENANT = "default"

# auto_error=False: a missing header gets our 401 body, the same as a bad key's; the scheme
# still puts `bearer` into the OpenAPI document.
_bearer = HTTPBearer(auto_error=False, description="an API key from `aetrain keys create`")


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_store(request: Request) -> JobStore:
    store: JobStore = request.app.state.store
    return store


async def get_storage(request: Request) -> Storage:
    storage: Storage = request.app.state.storage
    return storage


async def get_job_reads(request: Request) -> JobReads:
    reads: JobReads = request.app.state.job_reads
    return reads


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[JobStore, Depends(get_store)]
StorageDep = Annotated[Storage, Depends(get_storage)]
JobReadsDep = Annotated[JobReads, Depends(get_job_reads)]


async def get_caller(
    request: Request,
    settings: SettingsDep,
    store: StoreDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Caller:
    """The caller: the owner of its bearer key, or the `default` tenant with auth off.

    service.guards.RequestGuard authenticates every /v1 request before its body is read and
    leaves the caller here. A missing, malformed, unknown or revoked key is the same 401, so
    that a caller cannot tell which keys exist.
    """
    if settings.auth == "off":
        return Caller(DEFAULT_TENANT)
    caller: Caller | None = request.scope.get("state", {}).get("caller")
    if caller is None and credentials is not None:  # a route outside /v1 that wants a key
        caller = await run_in_threadpool(store.api_keys.caller, credentials.credentials)
    if caller is None:
        raise Unauthenticated()
    return caller


CallerDep = Annotated[Caller, Depends(get_caller)]


async def get_tenant(caller: CallerDep) -> str:
    return caller.tenant


TenantDep = Annotated[str, Depends(get_tenant)]
