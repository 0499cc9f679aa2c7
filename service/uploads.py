"""Reading an uploaded dataset safely: a size cap while the body streams, no pickle, and every
array header checked against the bytes that are really there before anything is allocated.

A file is accepted only whole: the upload lands in a temporary file that is removed whatever
happens, and the dataset is written to its content-addressed place only once it passed every
check, so a rejected upload leaves nothing behind.
"""

import hashlib
import math
import os
import uuid
import zipfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

from shared.datasets import MAX_CLASSES, MAX_FEATURES, MAX_ROWS, MIN_ROWS
from shared.errors import DatasetInvalid, UploadTooLarge

NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGIC = b"PK\x03\x04"
_MAX_HEADER_BYTES = 10_000
_ARRAYS = {"x.npy": "x", "y.npy": "y"}


@dataclass(frozen=True)
class ReceivedFile:
    path: Path
    sha256: str
    size: int


async def receive(chunks: AsyncIterator[bytes], folder: Path, max_bytes: int) -> ReceivedFile:
    """Write the body to a temporary file in `folder`, hashing it; stop past `max_bytes`."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{uuid.uuid4().hex}.part"
    digest, size = hashlib.sha256(), 0
    try:
        with open(path, "wb") as out:
            async for chunk in chunks:
                size += len(chunk)
                if size > max_bytes:
                    raise UploadTooLarge(max_bytes)
                digest.update(chunk)
                out.write(chunk)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return ReceivedFile(path, digest.hexdigest(), size)


@dataclass(frozen=True)
class Arrays:
    x: np.ndarray  # float32, rows first
    y: np.ndarray | None  # int64 labels, or None
    dtype: str  # x's dtype as uploaded


def load_arrays(path: Path, max_array_bytes: int) -> Arrays:
    """Parse an .npy (x) or .npz (x, optional y) file; DatasetInvalid names what is wrong."""
    with open(path, "rb") as f:
        magic = f.read(6)
    try:
        if magic.startswith(NPY_MAGIC):
            with open(path, "rb") as f:
                x = _read_array(f, "x", path.stat().st_size, max_array_bytes)
            y = None
        elif magic.startswith(ZIP_MAGIC):
            x, y = _read_npz(path, max_array_bytes)
        else:
            raise DatasetInvalid("file", "not an .npy or .npz file (send the file's raw bytes)")
    except (zipfile.BadZipFile, EOFError, OSError) as exc:
        raise DatasetInvalid("file", f"truncated or corrupt: {exc}") from None
    dtype = str(x.dtype)
    return Arrays(x=_check_x(x), y=None if y is None else _check_y(y, len(x)), dtype=dtype)


def _read_npz(path: Path, max_array_bytes: int) -> tuple[np.ndarray, np.ndarray | None]:
    arrays: dict[str, np.ndarray] = {}
    with zipfile.ZipFile(path) as archive:
        members = archive.infolist()
        names = [m.filename for m in members]
        unknown = sorted(set(names) - set(_ARRAYS))
        if unknown or len(names) != len(set(names)):
            raise DatasetInvalid("file", f"an .npz holds x and optionally y; found {names}")
        if "x.npy" not in names:
            raise DatasetInvalid("x", "the .npz has no array named x")
        budget = max_array_bytes
        for member in members:
            name = _ARRAYS[member.filename]
            # file_size is what the archive declares; zipfile checks it (and the CRC) on read.
            with archive.open(member) as f:
                arrays[name] = _read_array(f, name, member.file_size, budget)
            budget -= arrays[name].nbytes
    return arrays["x"], arrays.get("y")


def _read_array(f: IO[bytes], name: str, stored_bytes: int, max_bytes: int) -> np.ndarray:
    """Check the header's dtype and shape against the bytes stored, then read without pickle."""
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
    declared = math.prod(shape) * dtype.itemsize
    if declared > max_bytes:
        raise DatasetInvalid(name, f"shape {shape} of {dtype} is {declared} bytes; the limit is "
                             f"{max_bytes}")  # fmt: skip
    header_end = f.tell()
    if stored_bytes - header_end != declared:
        raise DatasetInvalid(name, f"the header declares shape {shape} ({declared} bytes) but "
                             f"the file holds {stored_bytes - header_end}")  # fmt: skip
    data = f.read(declared)
    if len(data) != declared:
        raise DatasetInvalid("file", f"truncated: {name} has {len(data)} of {declared} bytes")
    flat: np.ndarray = np.frombuffer(data, dtype=dtype)
    return flat.reshape(shape, order="F" if fortran_order else "C")


def _check_x(x: np.ndarray) -> np.ndarray:
    if x.ndim not in (2, 3, 4):
        raise DatasetInvalid("x", f"shape {x.shape}: expected (n, features), (n, h, w) or "
                             "(n, c, h, w)")  # fmt: skip
    if not MIN_ROWS <= len(x) <= MAX_ROWS:
        raise DatasetInvalid("x", f"{len(x)} rows; between {MIN_ROWS} and {MAX_ROWS} are accepted")
    features = math.prod(x.shape[1:])
    if not 1 <= features <= MAX_FEATURES:
        raise DatasetInvalid("x", f"{features} values per sample; at most {MAX_FEATURES}")
    with np.errstate(over="ignore"):  # an overflow becomes inf, which the check below refuses
        as_float = x.astype(np.float32)
    bad = int(np.size(as_float) - np.count_nonzero(np.isfinite(as_float)))
    if bad:
        raise DatasetInvalid("x", f"{bad} values are NaN or infinite (or overflow float32)")
    return as_float


def _check_y(y: np.ndarray, rows: int) -> np.ndarray:
    if y.shape != (rows,):
        raise DatasetInvalid("y", f"shape {y.shape}: expected ({rows},), one label per row of x")
    if y.dtype.kind not in "biu":
        raise DatasetInvalid("y", f"labels must be integers, not {y.dtype}")
    labels = y.astype(np.int64)
    if len(labels) and (labels.min() < 0 or labels.max() >= MAX_CLASSES):
        raise DatasetInvalid("y", f"labels must lie in 0..{MAX_CLASSES - 1}")
    return labels


def save_dataset(arrays: Arrays, target: Path) -> None:
    """Write the checked arrays where the workers read them, atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{uuid.uuid4().hex}.part")
    try:
        with open(partial, "wb") as out:
            if arrays.y is None:
                np.savez(out, x=arrays.x)
            else:
                np.savez(out, x=arrays.x, y=arrays.y)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


def label_counts(y: np.ndarray | None) -> dict[str, int] | None:
    if y is None:
        return None
    values, counts = np.unique(y, return_counts=True)
    return {str(int(v)): int(c) for v, c in zip(values, counts, strict=True)}
