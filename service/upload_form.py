"""Upload forms: a multipart/form-data body (`curl -F file=@d.npz`) read as it streams.

python-multipart's parser (the one Starlette uses) hands over the parts chunk by chunk; the
file part goes into the same capped, hashed temporary file as a raw body (uploads.Sink), so a
form gives the same dataset as its file's raw bytes and costs no more memory. Starlette's own
form parsing would spool the file to a temporary file of its own first, with no cap on it.
"""

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from service.uploads import ReceivedFile, Sink
from shared.errors import DatasetInvalid, UploadTooLarge

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

# What a form may add to its file: boundaries and part headers, a few hundred bytes from curl,
# httpx or a browser. The body as a whole is cut off past the file cap plus this.
FORM_OVERHEAD_BYTES = 64 * 1024
_MAX_PART_HEADER_BYTES = 8 * 1024  # one header line of a part: a long file name fits
DATASET_NAME = re.compile(r"^[A-Za-z0-9_.\- ]*$")  # the `name` query parameter's pattern too
MAX_NAME_CHARS = 100


@dataclass(frozen=True)
class ReceivedForm:
    file: ReceivedFile
    name: str  # the form's `name` field; "" without one


def form_boundary(content_type: str) -> bytes:
    """The boundary of a `multipart/form-data` Content-Type; DatasetInvalid for another
    multipart type or a missing boundary."""
    kind, options = parse_options_header(content_type)
    if kind != b"multipart/form-data":
        raise DatasetInvalid("file", f"a {kind.decode('latin-1')} body: send the file's raw "
                             "bytes or a multipart/form-data form")  # fmt: skip
    boundary = options.get(b"boundary", b"")
    if not 1 <= len(boundary) <= 70:  # RFC 2046
        raise DatasetInvalid("file", "the multipart/form-data Content-Type has no valid "
                             "boundary")  # fmt: skip
    return boundary


async def receive_form(
    chunks: AsyncIterator[bytes], boundary: bytes, folder: Path, max_bytes: int
) -> ReceivedForm:
    """Stream a multipart/form-data body: its one file part into a temporary file in `folder`
    as `receive` does (hashed, UploadTooLarge past `max_bytes`), and an optional `name` field.

    A form with no file part, two of them, or any other field is refused (DatasetInvalid
    naming it) as soon as the parser reaches it, as is a body cut off before its end.
    """
    sink = Sink(folder, max_bytes)
    form = _FormReader(sink)
    parser = MultipartParser(boundary, form.callbacks())
    body_bytes = 0
    try:
        async for chunk in chunks:
            body_bytes += len(chunk)
            if body_bytes > max_bytes + FORM_OVERHEAD_BYTES:  # junk around the file part
                raise UploadTooLarge(max_bytes)
            try:
                parser.write(chunk)
            except FormParserError as exc:
                raise DatasetInvalid("file", f"a malformed multipart body: {exc}") from None
        form.check_complete()
    except BaseException:
        sink.discard()
        raise
    return ReceivedForm(sink.finish(), form.name)


class _FormReader:
    """python-multipart's callbacks for an upload form: the file part's bytes go to the sink,
    a `name` field (at most 100 characters) is kept, and nothing else is held: each header is
    capped, and any other part is refused when its headers end."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.name = ""
        self.files = 0
        self.ended = False
        self._field, self._value = bytearray(), bytearray()  # the header being read
        self._disposition = b""
        self._part: str | None = None  # "file" or "name" while in a part's data
        self._name_bytes: bytearray | None = None

    def callbacks(self) -> "MultipartCallbacks":
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }

    def check_complete(self) -> None:
        if not self.ended:
            raise DatasetInvalid("file", "the multipart body ends before its closing boundary")
        if not self.files:
            raise DatasetInvalid("file", "the multipart form has no file part; send the file "
                                 "as one (curl -F file=@data.npz)")  # fmt: skip

    def _part_begin(self) -> None:
        self._disposition, self._part = b"", None

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._grow(self._field, data[start:end])

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._grow(self._value, data[start:end])

    def _grow(self, buffer: bytearray, data: bytes) -> None:
        if len(self._field) + len(self._value) + len(data) > _MAX_PART_HEADER_BYTES:
            raise DatasetInvalid("file", f"a multipart part header is longer than "
                                 f"{_MAX_PART_HEADER_BYTES} bytes")  # fmt: skip
        buffer += data

    def _header_end(self) -> None:
        if self._field.strip().lower() == b"content-disposition":
            self._disposition = bytes(self._value)
        self._field.clear()
        self._value.clear()

    def _headers_finished(self) -> None:
        kind, options = parse_options_header(self._disposition)
        if kind != b"form-data":
            raise DatasetInvalid("file", "a multipart part without Content-Disposition: "
                                 "form-data")  # fmt: skip
        field = options.get(b"name", b"").decode("latin-1")
        if b"filename" in options or field == "file":
            self.files += 1
            if self.files > 1:
                raise DatasetInvalid("file", "the multipart form has two file parts; send one "
                                     "file per upload")  # fmt: skip
            self._part = "file"
        elif field == "name" and self._name_bytes is None:
            self._part, self._name_bytes = "name", bytearray()
        else:
            shown = field[:64] + ("..." if len(field) > 64 else "")
            raise DatasetInvalid(
                "file", f"unexpected form field {shown!r}: an upload form has one file part "
                "and optionally one `name` field")  # fmt: skip

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._part == "file":
            self.sink.write(data[start:end])
        elif self._name_bytes is not None:
            self._name_bytes += data[start:end]
            if len(self._name_bytes) > MAX_NAME_CHARS:
                raise DatasetInvalid("name", f"at most {MAX_NAME_CHARS} characters")

    def _part_end(self) -> None:
        if self._part == "name" and self._name_bytes is not None:
            name = self._name_bytes.decode("utf-8", errors="replace")
            if not DATASET_NAME.match(name):
                raise DatasetInvalid("name", "letters, digits, spaces and _ . - only")
            self.name = name
        self._part = None

    def _end(self) -> None:
        self.ended = True
