"""FastAPI dependencies: the store and storage built once per app by its lifespan; the tenant."""

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

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


def get_tenant(
    settings: SettingsDep,
    store: StoreDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    """The caller's tenant: the owner of its bearer key, or `default` with auth off.

    A missing, malformed, unknown or revoked key is the same 401, so that a caller cannot
    tell which keys exist.
    """
    if settings.auth == "off":
        return DEFAULT_TENANT
    if credentials is None:
        raise Unauthenticated()
    tenant = store.api_keys.tenant_for_key(credentials.credentials)
    if tenant is None:
        raise Unauthenticated()
    return tenant


TenantDep = Annotated[str, Depends(get_tenant)]
