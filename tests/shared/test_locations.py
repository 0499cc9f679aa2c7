"""The S3 client is built from the usual AWS variables, as MinIO, Ceph and R2 users set them."""

from typing import Any

import pytest

from shared import locations


def client_options(monkeypatch: pytest.MonkeyPatch, **env: str) -> dict[str, Any]:
    for name in locations.AWS_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    options: dict[str, Any] = locations.s3_filesystem().__reduce__()[1][0]
    return options


@pytest.mark.parametrize(
    ("endpoint", "scheme", "host"),
    [
        ("http://127.0.0.1:9000", "http", "127.0.0.1:9000"),
        ("https://account.r2.cloudflarestorage.com", "https", "account.r2.cloudflarestorage.com"),
        ("minio:9000", "https", "minio:9000"),  # no scheme: a host and port, over TLS
    ],
)
def test_the_endpoint_variable_names_scheme_and_host(
    monkeypatch: pytest.MonkeyPatch, endpoint: str, scheme: str, host: str
) -> None:
    options = client_options(monkeypatch, AWS_ENDPOINT_URL=endpoint, AWS_REGION="eu-west-1")
    assert (options["scheme"], options["endpoint_override"], options["region"]) == (
        scheme, host, "eu-west-1",
    )  # fmt: skip


def test_the_s3_specific_endpoint_wins_and_the_region_has_a_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    options = client_options(monkeypatch, AWS_ENDPOINT_URL="http://general:1",
                             AWS_ENDPOINT_URL_S3="http://s3-only:2")  # fmt: skip
    assert options["endpoint_override"] == "s3-only:2" and options["region"] == "us-east-1"
    assert client_options(monkeypatch)["endpoint_override"] == ""  # AWS itself


def test_only_set_variables_travel_to_the_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    client_options(monkeypatch, AWS_REGION="eu-west-1", AWS_PROFILE="", HOME="/root")
    # Compose passes an unset ${AWS_PROFILE:-} as "": it must not hide a node's own setting.
    assert locations.aws_environment() == {"AWS_REGION": "eu-west-1"}


@pytest.mark.parametrize(
    ("location", "remote", "joined", "name"),
    [
        ("s3://b/p/runs", True, "s3://b/p/runs/j1-train", "runs"),
        ("/data/aetrain/runs", False, "/data/aetrain/runs/j1-train", "runs"),
    ],
)
def test_locations_join_and_name_alike_for_paths_and_urls(
    location: str, remote: bool, joined: str, name: str
) -> None:
    assert locations.is_remote(location) is remote
    assert locations.join(location, "j1-train") == joined
    assert locations.name_of(location + "/") == name
