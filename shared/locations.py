"""Locations: a local (or NFS) path, or an `s3://bucket/key` URL on object storage.

The workers hand each other locations as strings (a stage's run folder, its log, the
datasets folder), so a rank on another node reads and writes the same files whether the
storage is a mounted folder or a bucket. S3 goes through `pyarrow.fs.S3FileSystem`, which
comes with Ray; endpoint, region and credentials come from the usual AWS environment
variables (AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL, AWS_REGION or AWS_DEFAULT_REGION,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN), so MinIO, Ceph and R2 work too.

An object store has no rename and no partial object: a PUT lands whole or not at all. So a
local write here is a temporary file renamed into place, and a remote write is one PUT; a
reader sees the old bytes or the new, never half.
"""

import functools
import os
import posixpath
import shutil
import stat
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:  # pyarrow is imported only where a location is remote
    import pyarrow.fs

S3_SCHEME = "s3://"
COPY_CHUNK = 1 << 20
# What the AWS environment variables may say that changes which S3 client is built.
AWS_VARIABLES = (
    "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION",
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
)  # fmt: skip


@dataclass(frozen=True)
class Entry:
    """One name in a folder: a folder, a regular file (with its size), or (locally) a link."""

    name: str
    is_dir: bool
    is_file: bool  # a regular file: never a link
    size: int
    mtime: float  # seconds since the epoch; 0 where the store does not say (S3 folders)


def is_remote(location: str | Path) -> bool:
    return str(location).startswith(S3_SCHEME)


def join(location: str | Path, *names: str) -> str:
    return posixpath.join(str(location), *names)


def name_of(location: str | Path) -> str:
    return posixpath.basename(str(location).rstrip("/"))


def aws_environment() -> dict[str, str]:
    """The AWS variables set here: what a process on another node needs to reach the store."""
    # Unset in Compose is empty: an empty value would hide a node's own setting.
    return {name: os.environ[name] for name in AWS_VARIABLES if os.environ.get(name)}


def check_url(url: str) -> str:
    """An s3:// URL with a bucket, normalized (no trailing slash); ValueError names the fault."""
    parts = urlsplit(url)
    if parts.scheme != "s3":
        raise ValueError(f"{url!r}: only s3:// URLs name object storage")
    if not parts.netloc or parts.query or parts.fragment:
        raise ValueError(f"{url!r}: write s3://bucket or s3://bucket/prefix")
    prefix = parts.path.strip("/")
    if any(part in {"", ".", ".."} for part in prefix.split("/")) and prefix:
        raise ValueError(f"{url!r}: the prefix has an empty, '.' or '..' part")
    return f"s3://{parts.netloc}/{prefix}".rstrip("/")


def s3_filesystem() -> "pyarrow.fs.S3FileSystem":
    """The S3 client for the AWS variables set now (one per distinct set, reused)."""
    return _s3_filesystem(tuple(sorted(aws_environment().items())))


@functools.cache
def _s3_filesystem(environment: tuple[tuple[str, str], ...]) -> "pyarrow.fs.S3FileSystem":
    from pyarrow import fs

    env = dict(environment)
    options: dict[str, object] = {
        "region": env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
        # Fail a request to a store that is down in seconds, not after the SDK's minutes.
        "connect_timeout": 5.0,
        "request_timeout": 60.0,
        "retry_strategy": fs.AwsStandardS3RetryStrategy(max_attempts=3),
    }
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if endpoint:  # MinIO, Ceph, R2, a test's server: pyarrow reads no endpoint variable itself
        # `minio:9000` is a host and port (urlsplit would read a scheme `minio`): https then.
        parts = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        options["endpoint_override"] = parts.netloc
        options["scheme"] = parts.scheme
    return fs.S3FileSystem(**options)  # credentials: the AWS SDK's chain (the env vars first)


def _remote(location: str) -> tuple["pyarrow.fs.S3FileSystem", str]:
    """The client and the `bucket/key` path of an s3:// location."""
    return s3_filesystem(), location[len(S3_SCHEME) :].strip("/")


# -- reading ------------------------------------------------------------------------------------
def read_bytes(location: str | Path) -> bytes:
    """The whole file; FileNotFoundError if there is none."""
    if not is_remote(location):
        return Path(location).read_bytes()
    fs, path = _remote(str(location))
    _require_file(fs, path)
    with fs.open_input_stream(path) as stream:
        return bytes(stream.readall())


def read_range(location: str | Path, offset: int, limit: int) -> tuple[bytes, int, int]:
    """At most `limit` bytes from `offset` (negative: from the end), where they start, and the
    file's size; FileNotFoundError if there is none. A local link is never followed."""
    if not is_remote(location):
        fd = os.open(location, os.O_RDONLY | os.O_NOFOLLOW)
        with open(fd, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            start = min(size, offset if offset >= 0 else max(0, size + offset))
            file.seek(start)
            return file.read(min(limit, size - start)), start, size
    fs, path = _remote(str(location))
    size = _require_file(fs, path)
    start = min(size, offset if offset >= 0 else max(0, size + offset))
    count = min(limit, size - start)
    if count <= 0:
        return b"", start, size
    with fs.open_input_file(path) as file:
        return bytes(file.read_at(count, start)), start, size


def chunks(location: str | Path, chunk: int = COPY_CHUNK) -> Iterator[bytes]:
    """The file's bytes, `chunk` at a time: a download never holds the whole file."""
    if not is_remote(location):
        with open(location, "rb") as file:
            while data := file.read(chunk):
                yield data
        return
    fs, path = _remote(str(location))
    with fs.open_input_stream(path) as stream:
        while data := stream.read(chunk):
            yield bytes(data)


def size_of(location: str | Path) -> int | None:
    """A file's size; None if there is no such file (folders and links are not files)."""
    if not is_remote(location):
        try:
            info = os.lstat(location)
        except (FileNotFoundError, NotADirectoryError):
            return None
        return info.st_size if stat.S_ISREG(info.st_mode) else None
    fs, path = _remote(str(location))
    from pyarrow import fs as pafs

    found = fs.get_file_info(path)
    return int(found.size) if found.type == pafs.FileType.File else None


def entries(location: str | Path) -> list[Entry]:
    """What a folder holds, by name; [] if it is absent. Local links are listed as files."""
    if not is_remote(location):
        try:
            with os.scandir(location) as scan:
                found = []
                for item in scan:
                    info = item.stat(follow_symlinks=False)
                    is_dir, is_file = stat.S_ISDIR(info.st_mode), stat.S_ISREG(info.st_mode)
                    found.append(Entry(item.name, is_dir, is_file, info.st_size if is_file else 0,
                                       info.st_mtime))  # fmt: skip
                return sorted(found, key=lambda e: e.name)
        except (FileNotFoundError, NotADirectoryError):
            return []
    fs, path = _remote(str(location))
    from pyarrow import fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(
        (Entry(info.base_name, info.type == pafs.FileType.Directory,
               info.type == pafs.FileType.File, int(info.size or 0),
               info.mtime.timestamp() if info.mtime is not None else 0.0)
         for info in infos),
        key=lambda e: e.name,
    )  # fmt: skip


def tree_bytes(location: str | Path) -> int:
    """Bytes of the files under a folder (local links not followed); 0 if absent."""
    if not is_remote(location):
        total = 0
        for parent, _, files in os.walk(location):
            for name in files:
                try:
                    total += os.lstat(os.path.join(parent, name)).st_size
                except FileNotFoundError:
                    continue
        return total
    fs, path = _remote(str(location))
    from pyarrow import fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return sum(int(i.size or 0) for i in infos if i.type == pafs.FileType.File)


def download(location: str | Path, target: Path) -> Path:
    """Copy a file to a local path, whole or not at all (written beside it, then renamed)."""
    partial = target.with_name(f".{target.name}.{uuid.uuid4().hex}.part")
    try:
        with open(partial, "wb") as out:
            for data in chunks(location):
                out.write(data)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


# -- writing ------------------------------------------------------------------------------------
def write_bytes(location: str | Path, data: bytes, durable: bool = False) -> None:
    """Replace a file whole: a reader sees the old bytes or the new ones, never a mix.

    `durable`: a local file is on disk (fsync) before it takes the name; an S3 PUT is
    acknowledged only once stored.
    """
    if not is_remote(location):
        target = Path(location)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.{uuid.uuid4().hex}.part")
        try:
            with open(partial, "wb") as file:
                file.write(data)
                if durable:
                    file.flush()
                    os.fsync(file.fileno())
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
        return
    fs, path = _remote(str(location))
    with fs.open_output_stream(path) as stream:
        stream.write(data)


def upload(source: Path, location: str | Path) -> None:
    """Copy a local file to a location, whole or not at all."""
    if not is_remote(location):
        target = Path(location)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.{uuid.uuid4().hex}.part")
        try:
            shutil.copyfile(source, partial)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
        return
    fs, path = _remote(str(location))
    with open(source, "rb") as file, fs.open_output_stream(path) as stream:
        while data := file.read(COPY_CHUNK):
            stream.write(data)


def upload_tree(source: Path, location: str | Path) -> list[str]:
    """Copy the files under a local folder (links skipped); returns their relative names."""
    names = []
    for parent, _, files in os.walk(source):
        for name in sorted(files):
            path = Path(parent) / name
            if path.is_symlink():
                continue
            relative = path.relative_to(source).as_posix()
            upload(path, join(location, relative))
            names.append(relative)
    return names


def remove_tree(location: str | Path) -> int:
    """Delete a remote file or folder (everything under the prefix); returns bytes freed.

    Local deletions go through Storage.remove, which refuses paths outside the root."""
    if not is_remote(location):
        raise ValueError(f"{location}: a local path; delete it through Storage.remove")
    fs, path = _remote(str(location))
    from pyarrow import fs as pafs

    found = fs.get_file_info(path)
    if found.type == pafs.FileType.File:
        fs.delete_file(path)
        return int(found.size or 0)
    if found.type == pafs.FileType.NotFound:
        return 0
    freed = tree_bytes(location)
    try:
        fs.delete_dir(path)
    except FileNotFoundError:  # a concurrent deletion took it
        pass
    return freed


def scratch_folder(name: str) -> Path:
    """A local folder for files on their way to or from a remote store."""
    folder = Path(tempfile.gettempdir()) / f"aetrain-{name}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _require_file(fs: "pyarrow.fs.FileSystem", path: str) -> int:
    from pyarrow import fs as pafs

    found = fs.get_file_info(path)
    if found.type != pafs.FileType.File:
        raise FileNotFoundError(f"s3://{path}")
    return int(found.size or 0)
