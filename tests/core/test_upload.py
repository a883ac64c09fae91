"""The upload HTTP policy as plain functions: what is taken, what is refused, when files stay."""

from __future__ import annotations

import pytest

from qproxy.core.multipart import MultipartRewriter, RawBodyRewriter
from qproxy.core.upload import (
    Limits,
    Policy,
    Settle,
    UploadRequest,
    check_length,
    drain_budget,
    plan,
    refusal,
)
from qproxy.errors import LengthRequired, MalformedUpload, UploadTooLarge
from qproxy.headers import offload_token

POLICY = Policy(Limits(1000, 10, 100), raw_paths=("/api/files/*",), secret="s3cret")
MULTIPART = "multipart/form-data; boundary=xyz"


def req(**kw: object) -> UploadRequest:
    base: dict[str, object] = {"method": "POST", "path": "/upload", "content_length": "10"}
    return UploadRequest(**{**base, **kw})  # type: ignore[arg-type]


def test_multipart_post_is_rewritten() -> None:
    taken = plan(req(content_type=MULTIPART), POLICY)
    assert taken is not None and isinstance(taken.rewriter, MultipartRewriter)
    assert taken.length == 10 and not taken.offloaded and taken.raw_key is None


@pytest.mark.parametrize(
    "request_",
    [
        req(method="GET", content_type=MULTIPART),
        req(content_type="application/json"),
        req(method="PATCH", path="/api/files/a.bin", content_type="text/plain"),
        req(path="/elsewhere/a.bin", content_type="text/plain"),
    ],
)
def test_what_is_not_an_upload_passes_through(request_: UploadRequest) -> None:
    assert plan(request_, POLICY) is None


def test_raw_body_on_a_raw_path_names_the_file() -> None:
    taken = plan(req(method="PUT", path="/api/files/r%C3%A9sum%C3%A9.pdf"), POLICY)
    assert taken is not None and isinstance(taken.rewriter, RawBodyRewriter)
    assert taken.rewriter.start.filename == "résumé.pdf"
    assert taken.raw_key is not None and taken.raw_key.endswith(".pdf")
    named = plan(
        req(path="/api/files/x", content_disposition='attachment; filename="a.png"'), POLICY
    )
    assert named is not None and named.raw_key is not None and named.raw_key.endswith(".png")


@pytest.mark.parametrize(
    ("request_", "error", "status"),
    [
        (req(content_type="multipart/form-data"), MalformedUpload, 400),
        (req(content_type=MULTIPART, content_length="1001"), UploadTooLarge, 413),
        (req(content_type=MULTIPART, content_length="ten"), LengthRequired, 411),
        (req(content_type=MULTIPART, content_length="-1"), LengthRequired, 411),
        (req(content_type=MULTIPART, content_length=None), LengthRequired, 411),
        # Offload headers: only on a raw path, and only with nginx's token.
        (req(content_type=MULTIPART, body_file="/x", body_token="t"), MalformedUpload, 400),
        (req(path="/api/files/a", body_file="/x", body_token="forged"), MalformedUpload, 400),
        (req(path="/api/files/a", body_file="/x"), MalformedUpload, 400),
    ],
)
def test_refusals(request_: UploadRequest, error: type[Exception], status: int) -> None:
    with pytest.raises(error) as caught:
        plan(request_, POLICY)
    answer = refusal(caught.value)  # type: ignore[arg-type]
    assert answer.status == status
    assert "Connection" not in dict(answer.headers)  # hop-by-hop: PEP 3333 forbids it
    assert answer.body.endswith(b"\n") and int(dict(answer.headers)["Content-Length"]) == len(
        answer.body
    )


def test_framed_bodies_need_no_length() -> None:
    assert check_length(None, framed=True, max_body=5) is None
    taken = plan(req(content_type=MULTIPART, content_length=None, framed=True), POLICY)
    assert taken is not None and taken.length is None


def test_offloaded_body_with_nginx_token() -> None:
    token = offload_token("s3cret")
    taken = plan(req(path="/api/files/a.bin", body_file="/o/1", body_token=token), POLICY)
    assert taken is not None and taken.offloaded and taken.body_file == "/o/1"
    # nginx writes no file for an empty body: the token alone.
    empty = plan(req(path="/api/files/a.bin", body_token=token), POLICY)
    assert empty is not None and empty.offloaded and empty.body_file is None
    # Without a secret no token is ever nginx's.
    with pytest.raises(MalformedUpload):
        plan(
            req(path="/api/files/a", body_token=offload_token("")),
            Policy(POLICY.limits, POLICY.raw_paths),
        )


# -- Settle: the commit rule -----------------------------------------------------------------


def looked() -> Settle:
    settle = Settle()
    settle.looked_at()
    return settle


def test_settled_before_the_first_byte_by_status() -> None:
    for status, outcome in ((200, "commit"), (303, "commit"), (400, "discard"), (500, "discard")):
        settle = looked()
        settle.started(status)
        assert settle.sending() == outcome
        # Decided once: every later step has nothing to do.
        assert settle.sending() is None
        assert settle.failed() is None
        assert settle.finished() is None


def test_a_later_status_wins_until_the_answer_leaves() -> None:
    # WSGI's start_response may be called again (with exc_info) before any byte is sent.
    settle = looked()
    settle.started(200)
    settle.started(500)
    assert settle.sending() == "discard"


def test_nothing_is_decided_before_a_status() -> None:
    settle = Settle()
    assert settle.sending() is None
    assert settle.outcome is None


def test_an_app_that_raises_keeps_nothing() -> None:
    before_status = Settle()
    assert before_status.failed() == "discard"
    # A 2xx the client never saw (the app raised before its first byte): discarded too.
    unsent = Settle()
    unsent.started(201)
    assert unsent.failed() == "discard"
    # Raising after the 2xx left changes nothing: the client was told its files are kept.
    sent = looked()
    sent.started(201)
    assert sent.sending() == "commit"
    assert sent.failed() is None and sent.outcome == "commit"


def test_finished_without_a_status_keeps_nothing() -> None:
    assert Settle().finished() == "discard"
    answered = looked()
    answered.started(204)
    assert answered.finished() == "commit"


def test_files_the_app_never_looked_at_are_not_kept() -> None:
    # A login wall: 302 without reading the body. Anyone could fill the disk through it.
    wall = Settle()
    wall.started(302)
    assert wall.sending() == "discard"
    ignored = Settle()
    ignored.started(200)
    assert ignored.finished() == "discard"


def test_upload_paths_limit_where_uploads_are_taken() -> None:
    only = Policy(POLICY.limits, upload_paths=("/upload", "/api/*"))
    assert plan(req(content_type=MULTIPART), only) is not None
    assert plan(req(path="/api/v1/photos", content_type=MULTIPART), only) is not None
    assert plan(req(path="/login", content_type=MULTIPART), only) is None


def test_drain_budget_never_passes_the_limit() -> None:
    assert drain_budget(declared=10_000, received=0, max_body=5_000) == 0  # refused by length
    assert drain_budget(declared=3_000, received=1_000, max_body=5_000) == 2_000
    assert drain_budget(declared=None, received=1_000, max_body=5_000) == 4_000
    assert drain_budget(declared=None, received=9_000, max_body=5_000) == 0
