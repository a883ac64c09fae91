"""Property-based fuzzing of the sans-IO core and key validation (hypothesis): arbitrary
bytes split at arbitrary points raise nothing but the documented errors, valid forms
round-trip byte for byte whatever the chunking, and no key ever names a path outside the
root."""

from __future__ import annotations

import contextlib
import itertools
import os.path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qproxy.core.multipart import FileData, FileEnd, FileStart, MultipartRewriter
from qproxy.errors import InvalidKey, MalformedUpload, UploadTooLarge
from qproxy.keys import validate_key

BOUNDARY = "qpfuzzBoundary"
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def feed_all(body: bytes, cuts: list[int]) -> tuple[dict[str, bytes], MultipartRewriter]:
    rewriter = MultipartRewriter(
        BOUNDARY.encode(), max_body=1 << 20, max_parts=50, max_form_memory=1 << 16
    )
    files: dict[str, bytes] = {}
    current: str | None = None
    edges = sorted({c % (len(body) + 1) for c in cuts} | {0, len(body)})
    for start, end in itertools.pairwise(edges):
        for event in rewriter.feed(body[start:end]):
            if isinstance(event, FileStart):
                current = event.field
                files[current] = b""
            elif isinstance(event, FileData):
                assert current is not None
                files[current] += event.data
            elif isinstance(event, FileEnd):
                current = None
    rewriter.feed(b"")
    return files, rewriter


@FAST
@given(st.binary(max_size=2048), st.lists(st.integers(min_value=0), max_size=20))
def test_arbitrary_bytes_raise_only_documented_errors(body: bytes, cuts: list[int]) -> None:
    with contextlib.suppress(MalformedUpload, UploadTooLarge):
        feed_all(body, cuts)


# File contents that look like the framing: CR, LF, dashes, pieces of the boundary. Never
# the boundary itself: RFC 2046 5.1.1 has the encoder pick one that no part contains.
TRICKY = (
    st.lists(
        st.sampled_from(
            [b"\r", b"\n", b"-", b"--", BOUNDARY.encode()[:-1], b"x", b"\r\n--", b"\x00"]
        ),
        max_size=40,
    ).map(b"".join)
    | st.binary(max_size=512)
).filter(lambda content: BOUNDARY.encode() not in content)


def encode(files: dict[str, bytes], fields: dict[str, str]) -> bytes:
    """multipart/form-data as RFC 7578 and browsers write it (werkzeug's test encoder drops
    the CRLF before the delimiter of an empty part)."""
    out = b""
    for name, content in files.items():
        out += f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"; '.encode()
        out += f'filename="{name}.bin"\r\nContent-Type: application/octet-stream\r\n\r\n'.encode()
        out += content + b"\r\n"
    for name, value in fields.items():
        out += f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
        out += value.encode() + b"\r\n"
    return out + f"--{BOUNDARY}--\r\n".encode()


@FAST
@given(
    st.dictionaries(st.from_regex(r"[a-z]{1,8}", fullmatch=True), TRICKY, max_size=4),
    st.dictionaries(
        st.from_regex(r"[a-z]{1,8}", fullmatch=True),
        st.text(alphabet=st.characters(codec="utf-8"), max_size=40).filter(
            lambda v: BOUNDARY not in v
        ),
        max_size=4,
    ),
    st.lists(st.integers(min_value=0), max_size=30),
)
def test_valid_forms_round_trip_at_any_chunking(
    file_parts: dict[str, bytes], fields: dict[str, str], cuts: list[int]
) -> None:
    fields = {k: v for k, v in fields.items() if k not in file_parts}
    files, rewriter = feed_all(encode(file_parts, fields), cuts)
    assert files == file_parts
    rewritten = rewriter.body()
    for _name, value in fields.items():
        assert value.encode() in rewritten


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=200))
def test_no_key_names_a_path_outside_the_root(raw: str) -> None:
    try:
        key = validate_key(raw)
    except InvalidKey:
        return
    root = "/srv/qproxy"
    path = os.path.normpath(os.path.join(root, key))
    assert os.path.commonpath([root, path]) == root and path != root
    assert ".." not in key.split("/") and not key.startswith("/")
