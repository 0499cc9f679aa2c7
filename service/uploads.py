"""Reading an uploaded dataset safely: a size cap while the body streams, no pickle, and every
array header checked against the bytes that are really there before anything is allocated.

What an upload may cost is bounded by what it becomes, not by what it weighs: a 1 MB .npz of
zeros can declare a 1 GiB int8 array, which is 4 GiB as float32. So `max_dataset_bytes` counts
x as float32 and y as int64 and is checked on the headers alone, before any data is read; then
x streams through the float32 cast and the finiteness check into the stored file one chunk at a
time, so the API holds a few MiB whatever the dataset's size (y, at most 8 MB, is read whole).
Measured on 2 cores: a 1 MB .npz declaring 1 GiB of int8 took 6.4 GB and 21 s before, and is
now refused in milliseconds; an accepted one streams in a few MiB.

A file is accepted only whole: the upload lands in a temporary file that is removed whatever
happens, and the dataset is written to its content-addressed place only once it passed every
check, so a rejected upload leaves nothing behind.

The body is the file's raw bytes, or a multipart/form-data form whose file part streams into
the same capped, hashed temporary file (service/upload_form.py).
"""

import hashlib
import math
import os
import struct
import uuid
import zipfile
import zlib
from collections.abc import AsyncIterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from shared.datasets import MAX_CLASSES, MAX_FEATURES, MAX_ROWS, MIN_ROWS, DatasetFacts
from shared.errors import DatasetInvalid, UploadTooLarge

NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGIC = b"PK\x03\x04"
_MAX_HEADER_BYTES = 10_000
_ARRAYS = {"x.npy": "x", "y.npy": "y"}
_STORED_ITEMSIZE = {"x": 4, "y": 8}  # x is stored as float32, y as int64
CHUNK_VALUES = 2**20  # values cast at once: at most 8 MiB read and 4 MiB of float32
# Deflate level 1, measured on 64 MiB of float32 on 2 cores (write s / read s / stored MiB):
# zeros 0.09 / 0.04 / 0.3, 0..255 pixels 0.85 / 0.28 / 28, mostly-zero (MNIST-like) pixels
# 0.78 / 0.23 / 11, Gaussian noise 2.5 / 0.4 / 59; uncompressed is ~0.1 s and always 64 MiB, and
# level 6 is up to 10x slower for 10% less. Level 1 is paid once per distinct upload (a repeat
# is free) and keeps a small, very compressible upload from costing its float32 size on disk.
STORED_COMPRESSLEVEL = 1

# An .npz's central directory lists x and y in ~200 bytes. zipfile parses the whole directory
# into objects about ten times the size of their entries, so a big one is refused unread.
_MAX_DIRECTORY_BYTES = 4096
_EOCD = struct.Struct("<4s4H2LH")  # end of central directory record
_EOCD64_LOCATOR = struct.Struct("<4sLQL")
_EOCD64 = struct.Struct("<4sQ2H2L4Q")


@dataclass(frozen=True)
class ReceivedFile:
    path: Path
    sha256: str
    size: int


class Sink:
    """A temporary file in `folder` that takes an upload's bytes, hashing them; UploadTooLarge
    past `max_bytes`. `finish()` gives the file; `discard()` removes it."""

    def __init__(self, folder: Path, max_bytes: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"{uuid.uuid4().hex}.part"
        self.max_bytes = max_bytes
        self.digest, self.size = hashlib.sha256(), 0
        self.out = open(self.path, "wb")  # closed by finish() or discard()

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.max_bytes:
            raise UploadTooLarge(self.max_bytes)
        self.digest.update(chunk)
        self.out.write(chunk)

    def finish(self) -> ReceivedFile:
        self.out.close()
        return ReceivedFile(self.path, self.digest.hexdigest(), self.size)

    def discard(self) -> None:
        self.out.close()
        self.path.unlink(missing_ok=True)


async def receive(chunks: AsyncIterator[bytes], folder: Path, max_bytes: int) -> ReceivedFile:
    """Write the body to a temporary file in `folder`, hashing it; stop past `max_bytes`."""
    sink = Sink(folder, max_bytes)
    try:
        async for chunk in chunks:
            sink.write(chunk)
    except BaseException:
        sink.discard()
        raise
    return sink.finish()


@dataclass(frozen=True)
class _Array:
    """One array of an upload as its header declares it, and its stream past the header."""

    name: str  # "x" or "y"
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    fortran_order: bool
    stream: IO[bytes]

    @property
    def count(self) -> int:
        return math.prod(self.shape)

    def read(self, values: int) -> np.ndarray:
        """The next `values` values, as uploaded; DatasetInvalid if the file ends before."""
        wanted = values * self.dtype.itemsize
        try:
            data = self.stream.read(wanted)
        except (zipfile.BadZipFile, EOFError, OSError, zlib.error) as exc:
            raise DatasetInvalid("file", f"truncated or corrupt: {exc}") from None
        if len(data) != wanted:
            raise DatasetInvalid("file", f"truncated: {self.name} ends early")
        return np.frombuffer(data, dtype=self.dtype)


def store_upload(received: ReceivedFile, target: Path, max_bytes: int) -> DatasetFacts:
    """Check an .npy (x) or .npz (x, optional y) upload and store it at `target` as float32 x
    and int64 y; DatasetInvalid names what is wrong.

    `max_bytes` bounds x as float32 plus y as int64, from the headers, before any data is read.
    """
    path = received.path
    with open(path, "rb") as f:
        magic = f.read(6)
    with ExitStack() as stack:
        try:
            if magic.startswith(NPY_MAGIC):
                f = stack.enter_context(open(path, "rb"))
                arrays = {"x": _read_header(f, "x", path.stat().st_size, max_bytes)}
            elif magic.startswith(ZIP_MAGIC):
                arrays = _open_npz(path, stack, max_bytes)
            else:
                raise DatasetInvalid("file", "not an .npy or .npz file (send the file's raw bytes)")
        except (zipfile.BadZipFile, EOFError, OSError, zlib.error) as exc:
            raise DatasetInvalid("file", f"truncated or corrupt: {exc}") from None
        x, y = arrays["x"], arrays.get("y")
        stored = sum(a.count * _STORED_ITEMSIZE[a.name] for a in arrays.values())
        if stored > max_bytes:  # each fits alone (_read_header), so y is what goes past
            raise DatasetInvalid("y", f"x as float32 and y as int64 take {stored} bytes; the "
                                 f"limit is {max_bytes}")  # fmt: skip
        _check_x(x)
        labels = None if y is None else _read_labels(y, x.shape[0])
        _write_dataset(x, labels, target)
    return DatasetFacts(
        shape=x.shape,
        dtype=str(x.dtype),
        label_counts=label_counts(labels),
        size_bytes=received.size,
        sha256=received.sha256,
    )


def _open_npz(path: Path, stack: ExitStack, max_bytes: int) -> dict[str, _Array]:
    with open(path, "rb") as f:
        directory = _zip_directory_bytes(f)
    if directory > _MAX_DIRECTORY_BYTES:
        raise DatasetInvalid("file", f"an .npz holds x and optionally y; this archive's "
                             f"directory takes {directory} bytes")  # fmt: skip
    archive = stack.enter_context(zipfile.ZipFile(path))
    members = archive.infolist()
    names = [m.filename for m in members]
    unknown = sorted(set(names) - set(_ARRAYS))
    if unknown or len(names) != len(set(names)):
        raise DatasetInvalid("file", f"an .npz holds x and optionally y; found {names}")
    if "x.npy" not in names:
        raise DatasetInvalid("x", "the .npz has no array named x")
    arrays: dict[str, _Array] = {}
    for member in members:
        name = _ARRAYS[member.filename]
        # file_size is what the archive declares; zipfile checks it (and the CRC) on read.
        stream = stack.enter_context(archive.open(member))
        arrays[name] = _read_header(stream, name, member.file_size, max_bytes)
    return arrays


def _zip_directory_bytes(f: IO[bytes]) -> int:
    """The size of the central directory that zipfile will read, found as zipfile finds it
    (the end record, then a zip64 one just before it); 0 without one: zipfile refuses those."""
    size = f.seek(0, os.SEEK_END)
    f.seek(max(0, size - (_EOCD.size + 0xFFFF + _EOCD64_LOCATOR.size + _EOCD64.size)))
    tail = f.read()
    at = len(tail) - _EOCD.size  # no archive comment: the record ends the file
    if at < 0 or tail[at : at + 4] != b"PK\x05\x06" or tail[-2:] != b"\0\0":
        at = tail.rfind(b"PK\x05\x06")
        if at < 0 or at + _EOCD.size > len(tail):
            return 0
    directory: int = _EOCD.unpack_from(tail, at)[5]
    locator = at - _EOCD64_LOCATOR.size
    if locator >= _EOCD64.size and tail[locator : locator + 4] == b"PK\x06\x07":
        directory = max(directory, _EOCD64.unpack_from(tail, locator - _EOCD64.size)[7])
    return directory


def _read_header(f: IO[bytes], name: str, stored_bytes: int, max_bytes: int) -> _Array:
    """Check the header's dtype and shape against the cap and the bytes stored; read no data."""
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            header = np.lib.format.read_array_header_1_0(f, max_header_size=_MAX_HEADER_BYTES)
        else:
            header = np.lib.format.read_array_header_2_0(f, max_header_size=_MAX_HEADER_BYTES)
    except ValueError as exc:
        raise DatasetInvalid(name, f"not a valid .npy array: {exc}") from None
    shape, fortran_order, dtype = header
    if dtype.hasobject:
        raise DatasetInvalid(name, "an object array needs pickle to load; send numbers")
    if dtype.kind not in "biuf":
        raise DatasetInvalid(name, f"dtype {dtype} is not numeric (bool, int or float)")
    if any(side < 0 for side in shape):
        raise DatasetInvalid(name, f"shape {shape} has a negative side")
    stored_as = "float32" if name == "x" else "int64"
    stored = math.prod(shape) * _STORED_ITEMSIZE[name]
    if stored > max_bytes:
        raise DatasetInvalid(name, f"shape {shape} is {stored} bytes as {stored_as}; the limit "
                             f"is {max_bytes}")  # fmt: skip
    declared = math.prod(shape) * dtype.itemsize
    header_end = f.tell()
    if stored_bytes - header_end != declared:
        raise DatasetInvalid(name, f"the header declares shape {shape} ({declared} bytes) but "
                             f"the file holds {stored_bytes - header_end}")  # fmt: skip
    return _Array(name, shape, dtype, fortran_order, f)


def _check_x(x: _Array) -> None:
    if len(x.shape) not in (2, 3, 4):
        raise DatasetInvalid("x", f"shape {x.shape}: expected (n, features), (n, h, w) or "
                             "(n, c, h, w)")  # fmt: skip
    if not MIN_ROWS <= x.shape[0] <= MAX_ROWS:
        raise DatasetInvalid("x", f"{x.shape[0]} rows; between {MIN_ROWS} and {MAX_ROWS} are "
                             "accepted")  # fmt: skip
    features = math.prod(x.shape[1:])
    if not 1 <= features <= MAX_FEATURES:
        raise DatasetInvalid("x", f"{features} values per sample; at most {MAX_FEATURES}")


def _read_labels(y: _Array, rows: int) -> np.ndarray:
    if y.shape != (rows,):
        raise DatasetInvalid("y", f"shape {y.shape}: expected ({rows},), one label per row of x")
    if y.dtype.kind not in "biu":
        raise DatasetInvalid("y", f"labels must be integers, not {y.dtype}")
    labels = y.read(rows).astype(np.int64)
    if len(labels) and (labels.min() < 0 or labels.max() >= MAX_CLASSES):
        raise DatasetInvalid("y", f"labels must lie in 0..{MAX_CLASSES - 1}")
    return labels


def _write_dataset(x: _Array, y: np.ndarray | None, target: Path) -> None:
    """Write x (cast chunk by chunk) and y where the workers read them, atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{uuid.uuid4().hex}.part")
    try:
        with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED,
                             compresslevel=STORED_COMPRESSLEVEL) as archive:  # fmt: skip
            with archive.open("x.npy", "w", force_zip64=True) as out:
                _cast_x(x, out)
            if y is not None:
                with archive.open("y.npy", "w", force_zip64=True) as out:
                    np.lib.format.write_array(out, y, allow_pickle=False)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


def _cast_x(x: _Array, out: IO[bytes]) -> None:
    """x as an .npy of little-endian float32, one chunk at a time; every value must be finite."""
    header = {"descr": "<f4", "fortran_order": x.fortran_order, "shape": x.shape}
    np.lib.format.write_array_header_1_0(out, header)  # the values keep their order, C or F
    bad, left = 0, x.count
    while left:
        n = min(left, CHUNK_VALUES)
        with np.errstate(over="ignore", invalid="ignore"):  # overflow becomes inf: refused below
            values = x.read(n).astype("<f4")
        if x.dtype.kind == "f":  # integers and bools are always finite, even as float32
            bad += n - int(np.count_nonzero(np.isfinite(values)))
        out.write(values.data)
        left -= n
    if bad:
        raise DatasetInvalid("x", f"{bad} values are NaN or infinite (or overflow float32)")


def label_counts(y: np.ndarray | None) -> dict[str, int] | None:
    if y is None:
        return None
    values, counts = np.unique(y, return_counts=True)
    return {str(int(v)): int(c) for v, c in zip(values, counts, strict=True)}
