"""Path traversal over real HTTP: artifacts are served only by names from the job's own list.

The requests go through a real uvicorn with http.client, which sends a request target as
written; httpx (and so TestClient) would remove `../` segments before the app saw them.
"""

import http.client
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

import pytest
from starlette.types import ASGIApp, Receive, Scope, Send

from service.app import create_app
from shared.jobs import JobRecord
from shared.settings import Settings
from shared.storage import LocalStorage
from shared.store import JobStore
from tests.service.helpers import ARTIFACTS, artifact_bytes, serve, succeeded_job


@dataclass
class Target:
    base: str
    job: JobRecord
    canaries: list[bytes]  # no response may ever contain one of these
    canary_path: Path  # the one outside the storage root
    storage_root: Path
    seen: list[tuple[str, bytes]]  # (path, raw_path) of every request the app received


class Recorder:
    """ASGI wrapper that notes what reached the app, to prove a payload was not rewritten."""

    def __init__(self, app: ASGIApp, seen: list[tuple[str, bytes]]) -> None:
        self.app, self.seen = app, seen

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            self.seen.append((scope["path"], scope.get("raw_path", b"")))
        await self.app(scope, receive, send)


@pytest.fixture
def target(
    settings: Settings, store: JobStore, storage: LocalStorage, tmp_path: Path
) -> Iterator[Target]:
    job = succeeded_job(store, storage)
    outside = tmp_path / "outside"
    outside.mkdir()
    canary_path = outside / "canary.txt"
    canaries = [f"CANARY-{secrets.token_hex(16)}".encode() for _ in range(4)]
    canary_path.write_bytes(canaries[0])
    (storage.root / "canary.txt").write_bytes(canaries[1])  # inside the root, not an artifact
    (storage.root / "jobs" / job.id / "canary.txt").write_bytes(canaries[2])
    other = storage.root / "jobs" / "j-other" / "attempt-1"  # another job's files
    other.mkdir(parents=True)
    (other / "encoder.pt").write_bytes(canaries[3])
    seen: list[tuple[str, bytes]] = []
    with serve(Recorder(create_app(settings), seen)) as base:
        yield Target(base, job, canaries, canary_path, storage.root, seen)


def wire(text: str) -> str:
    """A request target http.client accepts: only non-ASCII, blanks and controls are escaped;
    the payload's own `%` sequences, dots and slashes go out as written."""
    return "".join(c if 0x20 < ord(c) < 0x7F and c not in "?#" else quote(c, safe="") for c in text)


def get(base: str, path: str) -> tuple[int, bytes]:
    status, body, _ = get_with_location(base, path)
    return status, body


def get_with_location(base: str, path: str) -> tuple[int, bytes, str | None]:
    parts = urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read(), response.getheader("location")
    finally:
        conn.close()


def traversal_names(canary: Path, root: Path) -> list[str]:
    """Artifact names that try to reach files other than the job's listed artifacts.

    The canary outside the root is 4 levels up from the artifact folder, `/` about 8."""
    names: set[str] = set()
    ups = [  # (one level up, the separator that goes with it)
        ("../", "/"),
        ("..\\", "\\"),
        ("%2e%2e/", "/"),
        ("%2e%2e%2f", "%2f"),
        ("%2E%2E%2F", "%2F"),
        ("..%2f", "%2f"),
        ("..%5c", "%5c"),
        ("%252e%252e%252f", "%252f"),
        ("..%252f", "%252f"),
        (".%2e/", "/"),
        ("%c0%ae%c0%ae/", "/"),
        ("..%c0%af", "%c0%af"),
        ("\uff0e\uff0e/", "/"),  # fullwidth full stops
        ("\u2024\u2024/", "/"),  # one dot leaders
        ("....//", "/"),
        ("..;/", "/"),
        ("..%00/", "/"),
        ("./../", "/"),
    ]
    goals = ["outside/canary.txt", "canary.txt", "etc/passwd", "j-other/attempt-1/encoder.pt"]
    for up, sep in ups:
        for depth in (1, 2, 3, 4, 8, 12):
            for goal in goals:
                names.add(up * depth + goal.replace("/", sep))
    names |= {
        "/etc/passwd",
        "%2fetc%2fpasswd",
        "//etc/passwd",
        str(canary),
        quote(str(canary), safe=""),
        str(canary).replace("/", "\\"),
        f"file://{canary}",
        "C:\\Windows\\win.ini",
        str(root / "canary.txt"),
        str(root / "jobs" / "j-other" / "attempt-1" / "encoder.pt"),
        "%00",
        "..",
        ".",
        "...",
        "%2e",
        "%2e%2e",
        "~",
        "~root",
        "$HOME",
        "canary.txt",
        "../canary.txt",
    }
    for artifact in ARTIFACTS:
        names |= {
            f"{artifact}%00",
            f"{artifact}%00.png",
            f"{artifact}/",
            f"{artifact}/.",
            f"{artifact}/..",
            f"{artifact}/../../../../outside/canary.txt",
            f"{artifact}%2f..%2f..%2f..%2f..%2foutside%2fcanary.txt",
            f"./{artifact}",
            f"%2e/{artifact}",
            f"{artifact};",
            f"{artifact}%3b",
            f"{artifact}%20",
            f"{artifact}.",
            f"{artifact}::$DATA",
            f"{artifact}%3f",
            f"{artifact}%23",
            artifact.upper(),
            f"..%2f{artifact}",
            f"attempt-1%2f{artifact}",
        }
    return sorted(names)


def test_traversal_names_are_404_and_never_leak_a_file(target: Target) -> None:
    job = target.job
    prefix = f"/v1/jobs/{job.id}/artifacts/"
    for name in ARTIFACTS:  # the harness works: listed names are served
        assert get(target.base, prefix + name) == (200, artifact_bytes(job.id, name))

    names = traversal_names(target.canary_path, target.storage_root)
    assert len(names) >= 100
    target.seen.clear()
    for name in names:
        status, body, location = get_with_location(target.base, prefix + wire(name))
        if status == 307:  # Starlette drops a trailing slash: harmless when it names an artifact
            assert name.endswith("/") and name[:-1] in ARTIFACTS, name
            assert location == target.base + prefix + name[:-1]
        else:
            assert status in (400, 404), (name, status, body[:200])
        for canary in target.canaries:
            assert canary not in body, name
        assert b"root:" not in body, name

    # The payloads reached the app as written: nothing on the way removed a `..`.
    assert len(target.seen) == len(names)
    raw = {raw_path for _, raw_path in target.seen}
    paths = {path for path, _ in target.seen}
    assert f"{prefix}../../../../outside/canary.txt".encode() in raw
    assert f"{prefix}{target.canary_path}".encode() in raw
    assert f"{prefix}%252e%252e%252f%252e%252e%252fcanary.txt".encode() in raw
    assert f"{prefix}%2e%2e%2f%2e%2e%2fcanary.txt".encode() in raw
    assert f"{prefix}../../canary.txt" in paths  # decoded by the server, still not normalized
    assert f"{prefix}..\\..\\canary.txt" in paths


def test_traversal_through_the_job_id_is_404(target: Target) -> None:
    for job_id in [
        "..",
        "%2e%2e",
        f"{target.job.id}/..",
        f"{target.job.id}%2f..%2fj-other",
        "../../../outside",
        "j-other",
        f"{target.job.id}%00",
        "*",
        f"{target.job.id[:-1]}*",
    ]:
        status, body = get(target.base, f"/v1/jobs/{wire(job_id)}/artifacts/encoder.pt")
        assert status in (400, 404), (job_id, status)
        assert all(canary not in body for canary in target.canaries)


@pytest.mark.parametrize(
    "fmt",
    [
        "",
        "pickle",
        "TORCHSCRIPT",
        "torchscript%00",
        "torchscript%2f..%2f..%2fcanary.txt",
        "encoder.pt",
        "canary.txt",
        "../canary.txt",
        "..%2f..%2f..%2f..%2foutside%2fcanary.txt",
        "%2e%2e%2fcanary.txt",
        "/etc/passwd",
        "safetensors/../../canary.txt",
        "torchscript&format=../canary.txt",
    ],
)
def test_bad_encoder_formats_are_refused(target: Target, fmt: str) -> None:
    status, body = get(target.base, f"/v1/jobs/{target.job.id}/encoder?format={wire(fmt)}")
    assert status == 422, (fmt, status)
    assert all(canary not in body for canary in target.canaries)
    assert b"root:" not in body
