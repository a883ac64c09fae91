"""The sans-IO multipart rewriter, byte by byte."""

from __future__ import annotations

import itertools

import pytest
from werkzeug.formparser import parse_form_data
from werkzeug.test import EnvironBuilder

from qproxy.core.multipart import (
    FileData,
    FileEnd,
    FileStart,
    MultipartRewriter,
    clean_content_type,
    clean_filename,
    multipart_boundary,
)
from qproxy.errors import MalformedUpload, UploadTooLarge

B = b"----qpboundary7MA4YWxk"


def part(name: str, value: bytes, filename: str | None = None, ctype: str | None = None) -> bytes:
    disp = f'form-data; name="{name}"'
    if filename is not None:
        disp += f'; filename="{filename}"'
    head = f"Content-Disposition: {disp}\r\n"
    if ctype:
        head += f"Content-Type: {ctype}\r\n"
    return b"--" + B + b"\r\n" + head.encode() + b"\r\n" + value + b"\r\n"


def body(*parts: bytes) -> bytes:
    return b"".join(parts) + b"--" + B + b"--\r\n"


def keys() -> object:
    counter = itertools.count(1)
    return lambda filename: f"k/{next(counter)}"


def rewriter(**limits: int) -> MultipartRewriter:
    opts = {"max_body": 10**9, "max_parts": 100, "max_form_memory": 1024 * 1024, **limits}
    return MultipartRewriter(B, make_key=keys(), **opts)  # type: ignore[arg-type]


def run(data: bytes, step: int | None = None, **limits: int) -> tuple[list[object], bytes]:
    r = rewriter(**limits)
    events: list[object] = []
    step = step or len(data) or 1
    for i in range(0, len(data), step):
        events += r.feed(data[i : i + step])
    events += r.feed(b"")
    return events, r.body()


def files_of(events: list[object]) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    current = None
    for e in events:
        if isinstance(e, FileStart):
            current = e.key
            out[current] = b""
        elif isinstance(e, FileData):
            assert current is not None
            out[current] += e.data
        elif isinstance(e, FileEnd):
            current = None
    return out


def form_of(rewritten: bytes) -> dict[str, list[str]]:
    env = EnvironBuilder(
        method="POST", data=rewritten, content_type=f"multipart/form-data; boundary={B.decode()}"
    ).get_environ()
    _, form, files = parse_form_data(env)
    assert not files, "the rewritten form must not contain files"
    return {k: form.getlist(k) for k in form}


PAYLOAD = bytes(range(256)) * 40 + b"\r\n--" + B[:-3] + b"\r\n\r\n--"  # boundary-like noise


@pytest.mark.parametrize("step", [1, 2, 3, 7, 64, 1000, None])
def test_files_become_key_fields_at_any_chunking(step: int | None) -> None:
    data = body(
        part("title", b"Hello\r\nworld"),
        part("file", PAYLOAD, "a.bin", "application/x-thing"),
        part("file", b"second", "b.txt", "text/plain"),
        part("note", "caf\u00e9".encode()),
    )
    events, rewritten = run(data, step)
    assert files_of(events) == {"k/1": PAYLOAD, "k/2": b"second"}
    starts = [e for e in events if isinstance(e, FileStart)]
    assert [(s.field, s.filename, s.content_type) for s in starts] == [
        ("file", "a.bin", "application/x-thing"),
        ("file", "b.txt", "text/plain"),
    ]
    assert form_of(rewritten) == {
        "title": ["Hello\r\nworld"],
        "file": ["k/1", "k/2"],
        "note": ["caf\u00e9"],
    }


def test_empty_file_with_name_is_kept_blank_file_input_is_not() -> None:
    events, rewritten = run(body(part("a", b"", "empty.txt"), part("b", b"", "")))
    assert files_of(events) == {"k/1": b"", "k/2": b""}
    ends = [e for e in events if isinstance(e, FileEnd)]
    assert [e.keep for e in ends] == [True, False]
    assert form_of(rewritten) == {"a": ["k/1"], "b": [""]}


def test_only_fields_pass_through() -> None:
    events, rewritten = run(body(part("x", b"1"), part("y", b"2")))
    assert events == []
    assert form_of(rewritten) == {"x": ["1"], "y": ["2"]}


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"garbage without any boundary",
        b"--" + B + b'\r\nContent-Disposition: form-data; name="a"\r\n\r\nno end',
        b"--" + B + b"\r\nX-No-Disposition: 1\r\n\r\nvalue\r\n--" + B + b"--\r\n",
        b"--" + B + b"\r\n" + b"X-Long: " + b"a" * 40000,
    ],
    ids=["empty", "garbage", "truncated", "no-disposition", "endless-headers"],
)
def test_malformed_bodies(data: bytes) -> None:
    with pytest.raises(MalformedUpload):
        run(data)


def test_limits() -> None:
    big = body(part("f", b"x" * 5000, "f.bin"))
    with pytest.raises(UploadTooLarge, match="larger than 1000 bytes"):
        run(big, 100, max_body=1000)
    many = body(*[part(f"p{i}", b"v") for i in range(5)])
    with pytest.raises(UploadTooLarge, match="more than 3 parts"):
        run(many, max_parts=3)
    with pytest.raises(UploadTooLarge, match="form fields"):
        run(body(part("t", b"y" * 5000)), max_form_memory=1000)


def test_data_after_end_is_refused() -> None:
    r = rewriter()
    r.feed(body(part("a", b"1")))
    r.feed(b"")
    with pytest.raises(MalformedUpload):
        r.feed(b"more")


def test_boundary() -> None:
    assert multipart_boundary("multipart/form-data; boundary=abc") == b"abc"
    assert multipart_boundary('multipart/form-data; boundary="a b"') == b"a b"
    assert multipart_boundary("application/json") is None
    assert multipart_boundary(None) is None
    for bad in ("multipart/form-data", "multipart/form-data; boundary=" + "a" * 71):
        with pytest.raises(MalformedUpload):
            multipart_boundary(bad)


def test_nasty_filenames_and_types() -> None:
    assert clean_filename("../../etc/passwd") == "passwd"
    assert clean_filename("a\r\nX-Accel-Redirect: x") == "aX-Accel-Redirect: x"
    assert clean_filename("\u00fcber caf\u00e9.txt") == "\u00fcber caf\u00e9.txt"
    assert clean_filename("C:\\Users\\me\\photo.jpg") == "photo.jpg"
    assert len(clean_filename("x" * 10000)) == 255
    # Bidi overrides, zero-width and other invisible characters never reach a header.
    assert clean_filename("invoice\u202egpj.exe") == "invoicegpj.exe"
    assert clean_filename("a\u200bb\ufeffc\u2066d\u2028e\x85f.txt") == "abcdef.txt"
    assert clean_filename("\U0001f600 ok.png") == "\U0001f600 ok.png"  # emoji are shown
    assert clean_content_type("text/html\r\nX-Evil: 1", "a.txt") == "text/plain"
    assert clean_content_type(None, "a.png") == "image/png"
    assert clean_content_type("application/octet-stream", "a.pdf") == "application/pdf"
    assert clean_content_type("image/JPEG; charset=x", "") == "image/jpeg"
    assert clean_content_type("", "") == "application/octet-stream"


def test_file_bytes_survive_boundary_lookalikes_at_every_chunk_size() -> None:
    """The fast path through file data (a chunk without ``--boundary`` is file data but for
    a tail) against werkzeug's own parser, with boundary look-alikes, lone CR/LF and
    delimiter prefixes falling on every chunk edge."""
    import random

    rng = random.Random(7)
    noise = [
        b"--" + B,  # the boundary without a line break before it: data
        b"\r\n-" + B,  # one dash short
        b"\r\n--" + B[:-1],  # one byte short
        b"\r",
        b"\n",
        b"\r\n",
        b"\r\r\n\n",
        b"--",
        B,
    ]
    payload = b"x".join(rng.choice(noise) + rng.randbytes(rng.randint(0, 30)) for _ in range(60))
    payload = payload.replace(b"\r\n--" + B + b"\r", b"").replace(b"\n--" + B, b"")
    data = body(part("file", payload, "a.bin"), part("t", b"after"), part("f2", b"\r\n", "c"))
    env = EnvironBuilder(
        method="POST", data=data, content_type=f"multipart/form-data; boundary={B.decode()}"
    ).get_environ()
    _, _, files = parse_form_data(env)
    reference = {name: storage.read() for name, storage in files.items()}
    for storage in files.values():
        storage.close()
    assert reference["file"] == payload  # the payload holds no real delimiter
    for step in [*range(1, 90), 127, 128, 129, 1000, len(data)]:
        events, rewritten = run(data, step)
        assert files_of(events) == {"k/1": payload, "k/2": b"\r\n"}, step
        assert form_of(rewritten) == {"file": ["k/1"], "t": ["after"], "f2": ["k/2"]}, step


@pytest.mark.parametrize("step", [1, 7, 1000, 16 * 1024, 128 * 1024, 1 << 20])
def test_part_header_limit_holds_at_every_feed_size(step: int) -> None:
    # 10,000 headers in one part (~90 kB): refused whether it arrives byte by byte or whole.
    headers = b"".join(b"X-H%d: v\r\n" % i for i in range(10_000))
    body = b"--" + B + b'\r\nContent-Disposition: form-data; name="t"\r\n' + headers
    body += b"\r\nv\r\n--" + B + b"--\r\n"
    rewriter = MultipartRewriter(B, max_body=1 << 30, max_parts=100, max_form_memory=1 << 20)
    with pytest.raises(MalformedUpload, match="headers too long"):
        for offset in range(0, len(body), step):
            rewriter.feed(body[offset : offset + step])
        rewriter.feed(b"")


@pytest.mark.parametrize("name", ["Content-Disposition", "Content-Type"])
def test_a_part_header_given_twice_is_refused(name: str) -> None:
    second = (
        b'Content-Disposition: form-data; name="b"'
        if name == "Content-Disposition"
        else b"Content-Type: text/html"
    )
    body = (
        b"--" + B + b'\r\nContent-Disposition: form-data; name="a"; filename="x.bin"\r\n'
        b"Content-Type: image/png\r\n" + second + b"\r\n\r\ndata\r\n--" + B + b"--\r\n"
    )
    rewriter = MultipartRewriter(B, max_body=1 << 20, max_parts=100, max_form_memory=1 << 20)
    with pytest.raises(MalformedUpload, match="more than one"):
        rewriter.feed(body)
        rewriter.feed(b"")
