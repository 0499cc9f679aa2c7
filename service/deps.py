"""FastAPI dependencies: the store and storage built once per app by its lifespan; the tenant."""

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from shared.apikey_store import Caller
from shared.errors import Unauthenticated
from shared.settings import Settings
from shared.storage import Storage
from shared.store import JobStore

DEFAULT_TENANT = "default"

# auto_error=False: a missing header gets our 401 body, the same as a bad key's; the scheme
# still puts `bearer` into the OpenAPI document.
_bearer = HTTPBearer(auto_error=False, description="an API key from `aetrain keys create`")


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_store(request: Request) -> JobStore:
    store: JobStore = request.app.state.store
    return store


def get_storage(request: Request) -> Storage:
    storage: Storage = request.app.state.storage
    return storage


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[JobStore, Depends(get_store)]
StorageDep = Annotated[Storage, Depends(get_storage)]


def get_caller(
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
        caller = store.api_keys.caller(credentials.credentials)
    if caller is None:
        raise Unauthenticated()
    return caller


CallerDep = Annotated[Caller, Depends(get_caller)]


def get_tenant(caller: CallerDep) -> str:
    return caller.tenant


TenantDep = Annotated[str, Depends(get_tenant)]
