"""API keys: their format, digest and tenants; JobStore keeps them in Redis as digests only.

A key reads `aet_<key id>_<secret>`. The id is public (listings, `aetrain keys revoke ID`); the
secret is 32 bytes from `secrets`, so a plain sha256 of the whole key is a safe digest to store:
there is nothing to brute-force, and a copy of Redis holds no key that would authenticate.
"""

import hashlib
import re
import secrets
from datetime import UTC, datetime

TENANT_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
KEY_PATTERN = re.compile(r"^aet_[0-9a-f]{12}_[A-Za-z0-9_-]{43}$")
KEY_ID_PATTERN = re.compile(r"^[0-9a-f]{12}$")
_SECRET_BYTES = 32


def check_tenant(tenant: str) -> str:
    if not TENANT_PATTERN.fullmatch(tenant):
        raise ValueError(
            f"tenant {tenant!r}: use 1 to 63 of a-z, 0-9, '_' and '-', starting with a letter "
            "or digit"
        )
    return tenant


def new_key() -> tuple[str, str]:
    """A fresh (key id, key)."""
    key_id = secrets.token_hex(6)
    return key_id, f"aet_{key_id}_{secrets.token_urlsafe(_SECRET_BYTES)}"


def looks_like_key(key: str) -> bool:
    """Cheap shape check, so that junk in a header never costs a Redis round trip."""
    return KEY_PATTERN.fullmatch(key) is not None


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def now_iso() -> str:
    return datetime.now(UTC).isoformat()
