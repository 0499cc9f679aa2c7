"""Dataset uploads over HTTP against a real Redis: the happy path, jobs that name an upload,
hostile files, each of which must get a 4xx and leave nothing behind, and what an upload may
cost the API: memory bounded whatever the file declares, a repeat that is never parsed."""

import io
import select
import socket
import tracemalloc
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sklearn.datasets import load_digits

from service.app import create_app
from service.upload_form import FORM_OVERHEAD_BYTES
from shared.settings import Settings
from shared.storage import LocalStorage
from shared.store import JobStore
from tests.service.helpers import serve
from tests.specs import digits_spec

pytestmark = pytest.mark.timeout(60)

SMALL_CAP = 64 * 1024
MiB = 2**20


def npz_bytes(compressed: bool = False, **arrays: Any) -> bytes:
    buffer = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buffer, **arrays)
    return buffer.getvalue()


def npy_bytes(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


def digits_images() -> tuple[np.ndarray, np.ndarray]:
    bunch = load_digits()
    return bunch.images[:300].astype(np.float32), bunch.target[:300].astype(np.int64)


def upload(client: TestClient, body: bytes | Iterator[bytes], name: str = "") -> Any:
    params = {"name": name} if name else {}
    return client.post("/v1/datasets", content=body, params=params,
                       headers={"Content-Type": "application/octet-stream"})  # fmt: skip


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


@pytest.fixture
def capped_client(settings: Settings, store: JobStore) -> Iterator[TestClient]:
    capped = settings.model_copy(update={"max_upload_bytes": SMALL_CAP})
    with TestClient(create_app(capped)) as test_client:
        yield test_client


def test_an_npz_upload_is_checked_described_and_content_addressed(
    client: TestClient, storage: LocalStorage
) -> None:
    x, y = digits_images()
    body = npz_bytes(x=x, y=y)
    response = upload(client, body, name="digits images")
    assert response.status_code == 201, response.text
    info = response.json()
    assert info["id"].startswith("ds-") and info["name"] == "digits images"
    assert info["shape"] == [300, 8, 8] and info["dtype"] == "float32"
    assert info["size_bytes"] == len(body)
    expected = {str(k): int(v) for k, v in zip(*np.unique(y, return_counts=True), strict=True)}
    assert info["label_counts"] == expected

    again = upload(client, body, name="another name")
    assert again.status_code == 200 and again.json() == info  # same bytes, same dataset
    other = upload(client, npz_bytes(x=x[:-1], y=y[:-1]))
    assert other.status_code == 201 and other.json()["id"] != info["id"]

    assert client.get(f"/v1/datasets/{info['id']}").json() == info
    listing = client.get("/v1/datasets").json()
    assert [d["id"] for d in listing["items"]] == [other.json()["id"], info["id"]]
    assert "digits" in listing["builtin"]
    stored = np.load(storage.dataset_file(info["id"]), allow_pickle=False)
    np.testing.assert_array_equal(stored["x"], x)
    np.testing.assert_array_equal(stored["y"], y)
    assert files_under(storage.incoming) == []


def test_an_npy_upload_has_no_labels(client: TestClient) -> None:
    x = np.random.default_rng(0).integers(0, 255, size=(50, 12)).astype(np.uint8)
    info = upload(client, npy_bytes(x)).json()
    assert info["shape"] == [50, 12] and info["dtype"] == "uint8"
    assert info["label_counts"] is None


def test_an_unknown_dataset_id_is_404(client: TestClient) -> None:
    assert client.get("/v1/datasets/ds-000000000000000000000000").status_code == 404
    assert client.get("/v1/datasets/..%2F..%2Fetc%2Fpasswd").status_code == 404


def test_uploads_belong_to_their_tenant(client: TestClient, store: JobStore) -> None:
    x, y = digits_images()
    info = upload(client, npz_bytes(x=x, y=y)).json()
    assert store.datasets.get("default", info["id"]).id == info["id"]
    assert store.datasets.list("someone-else") == []


def npy_header(shape: tuple[int, ...], descr: str) -> bytes:
    buffer = io.BytesIO()
    header = {"descr": descr, "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue()


def huge_npy_header() -> bytes:
    """A valid .npy header that declares 10^12 x 10 float64 values, followed by 80 bytes."""
    return npy_header((10**12, 10), "<f8") + b"\0" * 80


def corrupted(body: bytes) -> bytes:
    """The bytes with a run in the middle of the (compressed) data overwritten."""
    middle = len(body) // 2
    return body[:middle] + b"\xff" * 64 + body[middle + 64 :]


def many_members(count: int) -> bytes:
    """A small zip whose central directory lists `count` empty members."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for i in range(count):
            archive.writestr(f"{i}.npy", b"")
    return buffer.getvalue()


def npz_of(**members: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(f"{name}.npy", data)
    return buffer.getvalue()


def hostile_files() -> dict[str, tuple[bytes, str]]:
    """Files that must be refused, with a word the error must contain."""
    x, y = digits_images()
    good = npz_bytes(x=x, y=y)
    objects = np.array([{"a": 1}, [1, 2]] * 10, dtype=object)
    with_nan = x.copy()
    with_nan[3, 2, 1] = np.nan
    return {
        "object array (.npy, needs pickle)": (npy_bytes(objects, allow_pickle=True), "pickle"),
        "object array inside an .npz": (npz_of(x=npy_bytes(objects, allow_pickle=True)), "pickle"),
        "truncated zip": (good[: len(good) // 2], "file"),
        "truncated .npy": (npy_bytes(x.reshape(300, 64))[:-100], "x"),
        "NaN in x": (npz_bytes(x=with_nan, y=y), "NaN"),
        "inf in x": (npy_bytes(np.full((20, 3), np.inf)), "NaN"),
        "float64 beyond float32": (npy_bytes(np.full((20, 3), 1e300)), "overflow"),
        "header declares a huge shape (.npy)": (huge_npy_header(), "limit"),
        "header declares a huge shape (.npz)": (npz_of(x=huge_npy_header()), "limit"),
        "strings": (npy_bytes(np.array([["a", "b"]] * 20)), "numeric"),
        "complex numbers": (npy_bytes(np.ones((20, 2), dtype=np.complex64)), "numeric"),
        "one-dimensional x": (npy_bytes(np.ones(50, dtype=np.float32)), "shape"),
        "too few rows": (npy_bytes(np.ones((3, 4), dtype=np.float32)), "rows"),
        "labels of the wrong length": (npz_bytes(x=x, y=y[:-1]), "y"),
        "float labels": (npz_bytes(x=x, y=y.astype(np.float32)), "integers"),
        "negative labels": (npz_bytes(x=x, y=-y - 1), "0.."),
        "an extra array": (npz_bytes(x=x, y=y, z=y), "holds x"),
        "no x": (npz_bytes(y=y), "no array named x"),
        "not numpy at all": (b"hello, this is a text file" * 10, "not an .npy or .npz"),
        "a negative side": (npy_header((-2, -5), "<f4") + b"\0" * 40, "negative"),
        "corrupt compressed data": (corrupted(npz_bytes(x=x, y=y, compressed=True)), "corrupt"),
        "a zip directory of thousands of entries": (many_members(3000), "directory"),
        "empty body": (b"", "not an .npy or .npz"),
    }


@pytest.mark.parametrize("case", sorted(hostile_files()))
def test_a_hostile_upload_gets_a_4xx_and_leaves_nothing_behind(
    client: TestClient, storage: LocalStorage, case: str
) -> None:
    body, word = hostile_files()[case]
    response = upload(client, body)
    assert response.status_code == 422, (case, response.status_code, response.text)
    (error,) = response.json()["detail"]
    assert error["field"] in {"file", "x", "y"}, error
    assert word == error["field"] or word in error["msg"], error
    assert files_under(storage.datasets_root) == []
    assert client.get("/v1/datasets").json()["items"] == []


def test_a_body_past_the_cap_without_content_length_is_413_and_leaves_nothing(
    capped_client: TestClient, storage: LocalStorage
) -> None:
    sent = []

    def chunks() -> Iterator[bytes]:  # a generator body goes out chunked, with no length
        for _ in range(64):
            sent.append(4096)
            yield b"\0" * 4096

    response = upload(capped_client, chunks())
    assert response.status_code == 413, response.text
    assert str(SMALL_CAP) in response.json()["detail"]
    assert files_under(storage.datasets_root) == []


def test_a_declared_content_length_past_the_cap_is_413_before_reading(
    capped_client: TestClient, storage: LocalStorage
) -> None:
    response = upload(capped_client, b"\0" * (SMALL_CAP + 1))
    assert response.status_code == 413
    assert files_under(storage.datasets_root) == []


# -- multipart forms (`curl -F file=@d.npz`) -------------------------------------------------


def form_upload(client: TestClient, files: Any, data: Any = None, **params: str) -> Any:
    """A multipart/form-data POST as httpx (and curl -F) sends it."""
    return client.post("/v1/datasets", files=files, data=data, params=params)


def test_a_multipart_upload_is_the_same_dataset_as_its_raw_bytes(
    client: TestClient, storage: LocalStorage
) -> None:
    x, y = digits_images()
    body = npz_bytes(x=x, y=y)
    response = form_upload(client, {"file": ("d.npz", body)}, {"name": "from a form"})
    assert response.status_code == 201, response.text
    info = response.json()
    assert info["name"] == "from a form" and info["shape"] == [300, 8, 8]
    assert info["size_bytes"] == len(body)  # the file part's bytes, not the form's
    assert upload(client, body).json()["id"] == info["id"]  # the same bytes: the same dataset
    assert form_upload(client, {"data": ("other.npz", body)}).status_code == 200  # any field
    named = form_upload(client, {"file": ("d.npz", npz_bytes(x=x[:-1]))}, name="by query")
    assert named.status_code == 201 and named.json()["name"] == "by query"
    stored = np.load(storage.dataset_file(info["id"]), allow_pickle=False)
    np.testing.assert_array_equal(stored["x"], x)
    assert files_under(storage.incoming) == []


def raw_form(*parts: tuple[str, bytes], boundary: str = "b0undary", end: bool = True) -> bytes:
    """A multipart body from (part headers, content) pairs, closed unless `end` is False."""
    body = b"".join(
        f"--{boundary}\r\n{headers}\r\n\r\n".encode() + content + b"\r\n"
        for headers, content in parts
    )
    return body + (f"--{boundary}--\r\n".encode() if end else b"")


def file_part(name: str = "file", filename: str = "d.npz") -> str:
    return f'Content-Disposition: form-data; name="{name}"; filename="{filename}"'


def field_part(name: str) -> str:
    return f'Content-Disposition: form-data; name="{name}"'


def hostile_forms() -> dict[str, tuple[bytes, str, str, str]]:
    """Forms that must be refused: (body, Content-Type, field, a word of the message)."""
    x, y = digits_images()
    good = npz_bytes(x=x, y=y)
    form = "multipart/form-data; boundary=b0undary"
    return {
        "no file part": (raw_form((field_part("name"), b"only a name")), form, "file",
                         "no file part"),
        "two file parts": (raw_form((file_part(), good), (file_part("more"), good)), form,
                           "file", "two file parts"),
        "an unexpected field": (raw_form((field_part("note"), b"hi"), (file_part(), good)),
                                form, "file", "unexpected form field 'note'"),
        "two name fields": (raw_form((field_part("name"), b"a"), (field_part("name"), b"b"),
                                     (file_part(), good)), form, "file", "unexpected"),
        "a part without form-data": (raw_form(("Content-Type: text/plain", good)), form,
                                     "file", "form-data"),
        "a body cut before its closing boundary": (raw_form((file_part(), good), end=False),
                                                   form, "file", "closing boundary"),
        "no boundary": (raw_form((file_part(), good)), "multipart/form-data", "file",
                        "boundary"),
        "another multipart type": (raw_form((file_part(), good)),
                                   "multipart/mixed; boundary=b0undary", "file", "mixed"),
        "a huge part header": (raw_form((file_part(filename="a" * 20_000), good)), form,
                               "file", "header"),
        "a name the query would refuse": (raw_form((field_part("name"), b"../etc"),
                                                   (file_part(), good)), form, "name", "only"),
        "a file that is not numpy": (raw_form((file_part(), b"hello" * 10)), form, "file",
                                     "not an .npy or .npz"),
    }  # fmt: skip


@pytest.mark.parametrize("case", sorted(hostile_forms()))
def test_a_hostile_form_gets_a_422_naming_the_problem_and_leaves_nothing(
    client: TestClient, storage: LocalStorage, case: str
) -> None:
    body, content_type, field, words = hostile_forms()[case]
    response = client.post("/v1/datasets", content=body, headers={"Content-Type": content_type})
    assert response.status_code == 422, (case, response.status_code, response.text)
    (error,) = response.json()["detail"]
    assert error["field"] == field and words in error["msg"], error
    assert files_under(storage.datasets_root) == [] and files_under(storage.incoming) == []
    assert client.get("/v1/datasets").json()["items"] == []


def test_a_name_given_twice_differently_is_refused(
    client: TestClient, storage: LocalStorage
) -> None:
    x, y = digits_images()
    files = {"file": ("d.npz", npz_bytes(x=x, y=y))}
    response = form_upload(client, files, {"name": "form"}, name="query")
    assert response.status_code == 422 and response.json()["detail"][0]["field"] == "name"
    assert files_under(storage.root) == []
    assert form_upload(client, files, {"name": "same"}, name="same").status_code == 201


def test_a_form_file_past_the_cap_is_413_and_the_cap_is_the_files_not_the_forms(
    capped_client: TestClient, storage: LocalStorage
) -> None:
    past = form_upload(capped_client, {"file": ("d.npz", b"\0" * (SMALL_CAP + 1))})
    assert past.status_code == 413, past.text
    assert str(SMALL_CAP) in past.json()["detail"]
    # A file of exactly the cap passes the size check (its boundaries come on top) and is
    # judged on its content.
    at_cap = form_upload(capped_client, {"file": ("d.npz", b"\0" * SMALL_CAP)})
    assert at_cap.status_code == 422 and "not an .npy" in at_cap.json()["detail"][0]["msg"]
    # A declared length past the cap and what a form may add is refused before any reading.
    declared = capped_client.post(
        "/v1/datasets", content=b"\0" * (SMALL_CAP + FORM_OVERHEAD_BYTES + 1),
        headers={"Content-Type": "multipart/form-data; boundary=b0undary"},
    )  # fmt: skip
    assert declared.status_code == 413
    assert files_under(storage.root) == []


def send_until_answered(url: str, head: bytes, total: int) -> tuple[bytes, int]:
    """POST `head` and then zeros, chunked, up to `total` bytes of body, on a raw socket; stop
    sending once the server has answered. Returns the answer and the body bytes sent by then."""
    host, port = url.removeprefix("http://").split(":")
    request = b"POST /v1/datasets HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n"
    request += head
    chunk = b"\0" * (256 * 1024)
    framed = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    sent = 0
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        while sent < total:
            readable, writable, _ = select.select([sock], [sock], [], 10)
            if readable:
                break  # the answer came: a real client stops sending here
            if writable:
                try:
                    sock.sendall(framed)
                except (BrokenPipeError, ConnectionResetError):
                    break
                sent += len(chunk)
        answer = b""
        while b"\r\n\r\n" not in answer:
            data = sock.recv(65536)
            if not data:
                break
            answer += data
    return answer, sent


@pytest.mark.parametrize("shape", ["multipart", "raw"])
def test_a_body_far_past_the_cap_is_answered_413_long_before_it_is_all_sent(
    settings: Settings, store: JobStore, storage: LocalStorage, shape: str
) -> None:
    # The server reads what it needs (the cap, plus what a form may add), then answers and
    # drops the connection; the client has by then sent only what the socket buffers hold
    # (3.5 MiB of 512 here, with 1.1 MiB traced at the peak, either shape).
    total = 512 * MiB
    if shape == "multipart":
        preamble = (f"--b0undary\r\n{file_part()}\r\n\r\n").encode()
        head = (b"Content-Type: multipart/form-data; boundary=b0undary\r\n\r\n"
                + f"{len(preamble):x}\r\n".encode() + preamble + b"\r\n")  # fmt: skip
    else:
        head = b"Content-Type: application/octet-stream\r\n\r\n"
    capped = settings.model_copy(update={"max_upload_bytes": SMALL_CAP})
    with serve(create_app(capped)) as url:
        (answer, sent), peak = peak_memory(lambda: send_until_answered(url, head, total))
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    print(f"{shape}: 413 after {sent / MiB:.1f} of {total / MiB:.0f} MiB sent; "
          f"{peak / MiB:.1f} MiB traced")  # fmt: skip
    assert sent < 32 * MiB, f"{sent / MiB:.0f} MiB of {total / MiB:.0f} MiB sent"
    assert peak < 32 * MiB, f"{peak / MiB:.0f} MiB"
    assert files_under(storage.root) == []


# -- jobs that name an upload -----------------------------------------------------------------


def uploaded(client: TestClient, **arrays: Any) -> str:
    response = upload(client, npz_bytes(**arrays))
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def conv_spec(dataset: str) -> dict[str, Any]:
    spec = digits_spec()
    spec["data"]["dataset"] = dataset
    spec["model"] = {"arch": "conv", "channels": [4, 8], "kernel_size": 3, "stride": 2,
                     "latent_dim": 8}  # fmt: skip
    return spec


def test_a_job_on_an_image_upload_gets_its_shape_in_the_spec(client: TestClient) -> None:
    x, y = digits_images()
    dataset = uploaded(client, x=x, y=y)
    response = client.post("/v1/jobs", json=conv_spec(dataset))
    assert response.status_code == 201, response.text
    data = response.json()["spec"]["data"]
    assert data["dataset"] == dataset
    assert data["upload"] == {"input_shape": [1, 8, 8], "rows": 300, "classes": 10}
    four_d = uploaded(client, x=np.stack([x, x], axis=1), y=y)
    response = client.post("/v1/jobs", json=conv_spec(four_d))
    assert response.json()["spec"]["data"]["upload"]["input_shape"] == [2, 8, 8]


def test_what_a_client_sends_as_upload_is_replaced_by_the_index(client: TestClient) -> None:
    x, y = digits_images()
    dataset = uploaded(client, x=x, y=y)
    spec = digits_spec()
    spec["data"] = {"dataset": dataset, "upload": {"input_shape": [3], "rows": 10}}
    response = client.post("/v1/jobs", json=spec)
    assert response.status_code == 201, response.text
    assert response.json()["spec"]["data"]["upload"]["input_shape"] == [1, 8, 8]


def field_of(response: Any) -> list[str]:
    assert response.status_code == 422, response.text
    return [e["field"] for e in response.json()["detail"]]


def test_jobs_on_uploads_are_checked_against_the_uploads_shape(client: TestClient) -> None:
    x, y = digits_images()
    flat = uploaded(client, x=x.reshape(300, 64))
    assert field_of(client.post("/v1/jobs", json=conv_spec(flat))) == ["model.arch"]
    unknown = conv_spec("ds-000000000000000000000000")
    assert field_of(client.post("/v1/jobs", json=unknown)) == ["data.dataset"]
    malformed = conv_spec("ds-../../etc")
    assert field_of(client.post("/v1/jobs", json=malformed)) == ["data.dataset"]
    builtin_with_upload = digits_spec()
    builtin_with_upload["data"]["upload"] = {"input_shape": [64], "rows": 100}
    assert field_of(client.post("/v1/jobs", json=builtin_with_upload)) == ["data.upload"]


def test_semisupervised_needs_an_upload_with_labels(client: TestClient) -> None:
    x, y = digits_images()
    spec: dict[str, Any] = {
        "kind": "semisupervised", "data": {"dataset": uploaded(client, x=x)},
        "labeled_fraction": 0.1,
        "pretrain": {"kind": "autoencoder", "model": {"latent_dim": 8}},
    }  # fmt: skip
    assert field_of(client.post("/v1/jobs", json=spec)) == ["data.dataset"]
    spec["data"]["dataset"] = uploaded(client, x=x, y=y)
    assert client.post("/v1/jobs", json=spec).status_code == 201


# -- what an upload may cost ----------------------------------------------------------------

T = TypeVar("T")


def peak_memory(call: Callable[[], T]) -> tuple[T, int]:
    """call()'s result and the most bytes Python and numpy held at once during it, above what
    they held before (tracemalloc sees every thread: the API runs in TestClient's)."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        result = call()
        return result, tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()


def deflated_npz(path: Path, shape: tuple[int, ...], descr: str = "|i1") -> None:
    """An .npz whose x of zeros streams through deflate: the test never holds the array."""
    zeros = bytes(MiB)
    left = int(np.prod(shape)) * np.dtype(descr).itemsize
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        with archive.open("x.npy", "w", force_zip64=True) as out:
            out.write(npy_header(shape, descr))
            while left:
                out.write(zeros[: min(left, MiB)])
                left -= min(left, MiB)


@pytest.fixture(scope="module")
def gib_of_int8_zeros(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A ~1 MB .npz that declares x as 1024 x 2^20 int8 zeros: 1 GiB, 4 GiB as float32."""
    path = tmp_path_factory.mktemp("hostile") / "zeros.npz"
    deflated_npz(path, (1024, 2**20))
    return path.read_bytes()


def test_a_small_npz_declaring_a_huge_array_is_refused_from_its_header_in_bounded_memory(
    client: TestClient, storage: LocalStorage, gib_of_int8_zeros: bytes
) -> None:
    # Before the cap counted float32 and the cast streamed, this file took 6.4 GB and 21 s.
    assert len(gib_of_int8_zeros) < 1.2 * MiB
    response, peak = peak_memory(lambda: upload(client, gib_of_int8_zeros))
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert error["field"] == "x" and "float32" in error["msg"] and "limit" in error["msg"]
    assert peak < 200 * MiB, f"{peak / MiB:.0f} MiB"
    assert files_under(storage.datasets_root) == []


def test_an_upload_at_the_cap_streams_in_less_than_one_float32_copy(
    settings: Settings, store: JobStore, storage: LocalStorage
) -> None:
    cap = 64 * MiB
    rows, features = 1024, 16 * 1024  # int8: 16 MiB uploaded, 64 MiB as float32
    x = (np.arange(rows * features, dtype=np.int64) % 251 - 125).astype(np.int8)
    body = npz_bytes(x=x.reshape(rows, features), compressed=True)
    capped = settings.model_copy(update={"max_dataset_bytes": cap})
    with TestClient(create_app(capped)) as client:
        response, peak = peak_memory(lambda: upload(client, body))
        assert response.status_code == 201, response.text
        # The cast streams chunk by chunk into the stored file: the API never holds x whole,
        # neither as uploaded (16 MiB) nor as float32 (64 MiB).
        assert peak < 48 * MiB, f"{peak / MiB:.0f} MiB"
        info = response.json()
        assert info["shape"] == [rows, features] and info["dtype"] == "int8"
        with np.load(storage.dataset_file(info["id"]), allow_pickle=False) as stored:
            assert stored["x"].dtype == np.float32 and stored["x"].shape == (rows, features)
            np.testing.assert_array_equal(stored["x"].ravel(), x)

        # One row more is past the cap, and so are labels on top of an x at the cap.
        past = upload(client, npz_bytes(x=np.zeros((rows + 1, features), np.int8),
                                        compressed=True))  # fmt: skip
        assert [e["field"] for e in past.json()["detail"]] == ["x"], past.text
        labeled = npz_bytes(x=np.zeros((rows, features), np.int8), y=np.zeros(rows, np.int64),
                            compressed=True)  # fmt: skip
        with_y = upload(client, labeled)
        assert [e["field"] for e in with_y.json()["detail"]] == ["y"], with_y.text
        assert "limit" in with_y.json()["detail"][0]["msg"]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def stats(path: Path) -> tuple[int, int]:
    status = path.stat()
    return status.st_ino, status.st_mtime_ns


def test_the_same_bytes_again_are_indexed_without_being_parsed(
    settings: Settings, store: JobStore, storage: LocalStorage
) -> None:
    x, y = digits_images()
    body = npz_bytes(x=x, y=y)
    alice, bob = (bearer(store.api_keys.create(tenant)[1]) for tenant in ("alice", "bob"))
    with TestClient(create_app(settings.model_copy(update={"auth": "on"}))) as client:
        first = client.post("/v1/datasets", content=body, headers=alice)
        assert first.status_code == 201, first.text
        dataset = first.json()["id"]
        npz, facts = storage.dataset_file(dataset), storage.dataset_facts_file(dataset)
        files, before = files_under(storage.root), (stats(npz), stats(facts))
        assert npz in files and facts in files

        # Another tenant sends the same bytes: new to its index, nothing written in storage.
        second = client.post("/v1/datasets", content=body, headers=bob, params={"name": "b"})
        assert second.status_code == 201, second.text
        assert {**second.json(), "name": "upload", "created_at": None} == {
            **first.json(), "created_at": None}  # fmt: skip
        assert files_under(storage.root) == files and (stats(npz), stats(facts)) == before

        # The reply comes from the stored facts, not from the bytes: a third tenant is told
        # what the facts say (edited here to tell them apart), and storage is left alone.
        stored = storage.stored_facts(dataset)
        assert stored is not None
        facts.write_text(stored.model_copy(update={"dtype": "from-the-facts"}).model_dump_json())
        carol = bearer(store.api_keys.create("carol")[1])
        third = client.post("/v1/datasets", content=body, headers=carol)
        assert third.status_code == 201 and third.json()["dtype"] == "from-the-facts"
        assert stats(npz) == before[0]

        again = client.post("/v1/datasets", content=body, headers=alice)
        assert again.status_code == 200 and again.json() == first.json()


def test_a_dataset_without_its_facts_is_parsed_and_stored_again(
    client: TestClient, storage: LocalStorage
) -> None:
    x, y = digits_images()
    body = npz_bytes(x=x, y=y)
    info = upload(client, body).json()
    storage.dataset_facts_file(info["id"]).unlink()  # as if the API died between the two files
    storage.dataset_file(info["id"]).write_bytes(b"half a file")
    assert upload(client, body).status_code == 200
    assert storage.stored_facts(info["id"]) is not None
    with np.load(storage.dataset_file(info["id"]), allow_pickle=False) as stored:
        np.testing.assert_array_equal(stored["x"], x)
