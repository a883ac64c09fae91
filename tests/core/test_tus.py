"""The tus protocol's rules, without I/O (qproxy/core/tus.py)."""

from __future__ import annotations

import base64

import pytest

from qproxy.core import tus
from qproxy.core.tus import TusRefusal, Upload, check_patch, parse

MAX = 1000
V = {"tus-resumable": "1.0.0"}
ID = "web-1.abcdefghijklmnopqrstuvwx"


def refused(method: str, rest: str, headers: dict[str, str]) -> int:
    with pytest.raises(TusRefusal) as caught:
        parse(method, rest, headers, max_size=MAX)
    return caught.value.status


def test_options_needs_no_version_and_lists_the_extensions() -> None:
    assert parse("OPTIONS", "", {}, max_size=MAX).kind == "options"
    answer = dict(tus.options_answer(max_size=MAX).headers)
    assert answer["Tus-Version"] == "1.0.0" and answer["Tus-Max-Size"] == str(MAX)
    assert "creation" in answer["Tus-Extension"].split(",")
    assert "sha1" in answer["Tus-Checksum-Algorithm"].split(",")


def test_every_other_request_needs_tus_resumable() -> None:
    assert refused("POST", "", {"upload-length": "5"}) == 412
    with pytest.raises(TusRefusal) as caught:
        parse("HEAD", ID, {"tus-resumable": "0.2.2"}, max_size=MAX)
    assert ("Tus-Version", "1.0.0") in caught.value.headers


def test_creation() -> None:
    meta = "filename " + base64.b64encode("r\u00e9sum\u00e9.pdf".encode()).decode() + ",private"
    call = parse("POST", "", {**V, "upload-length": "10", "upload-metadata": meta}, max_size=MAX)
    assert (call.kind, call.length, call.defer_length) == ("create", 10, False)
    assert tus.parse_metadata(call.metadata) == {"filename": "r\u00e9sum\u00e9.pdf", "private": ""}
    deferred = parse("POST", "", {**V, "upload-defer-length": "1"}, max_size=MAX)
    assert deferred.length is None and deferred.defer_length
    assert refused("POST", "", V) == 400  # neither
    assert refused("POST", "", {**V, "upload-length": "1", "upload-defer-length": "1"}) == 400
    assert refused("POST", "", {**V, "upload-length": "-1"}) == 400
    assert refused("POST", "", {**V, "upload-length": str(MAX + 1)}) == 413
    assert refused("POST", "", {**V, "upload-length": "1", "upload-metadata": "a !!"}) == 400
    assert refused("POST", "", {**V, "upload-length": "1", "upload-metadata": "a,a"}) == 400
    # creation-with-upload: a body needs the offset type.
    body = {**V, "upload-length": "5", "content-length": "5"}
    assert refused("POST", "", body) == 415
    call = parse("POST", "", {**body, "content-type": tus.OFFSET_TYPE}, max_size=MAX)
    assert call.body_length == 5


def test_patch_and_its_offset() -> None:
    headers = {**V, "content-type": tus.OFFSET_TYPE, "upload-offset": "3", "content-length": "4"}
    call = parse("PATCH", ID, headers, max_size=MAX)
    assert (call.kind, call.upload_id, call.offset) == ("patch", ID, 3)
    upload = Upload(ID, length=10, offset=3)
    assert check_patch(call, upload, max_size=MAX) is None
    with pytest.raises(TusRefusal) as caught:
        check_patch(call, Upload(ID, length=10, offset=2), max_size=MAX)
    assert caught.value.status == 409
    with pytest.raises(TusRefusal) as caught:
        check_patch(call, Upload(ID, length=5, offset=3), max_size=MAX)
    assert caught.value.status == 413  # 3 + 4 > 5
    assert refused("PATCH", ID, {**V, "upload-offset": "0"}) == 415
    assert refused("PATCH", ID, {**V, "content-type": tus.OFFSET_TYPE}) == 400
    # A deferred length is given by a PATCH, once.
    late = parse("PATCH", ID, {**headers, "upload-length": "9"}, max_size=MAX)
    assert check_patch(late, Upload(ID, length=None, offset=3), max_size=MAX) == 9
    with pytest.raises(TusRefusal):
        check_patch(late, Upload(ID, length=10, offset=3), max_size=MAX)


def test_checksums_and_methods() -> None:
    headers = {**V, "content-type": tus.OFFSET_TYPE, "upload-offset": "0"}
    digest = base64.b64encode(b"\x01" * 20).decode()
    call = parse("PATCH", ID, {**headers, "upload-checksum": f"sha1 {digest}"}, max_size=MAX)
    assert call.checksum == tus.Checksum("sha1", b"\x01" * 20)
    assert refused("PATCH", ID, {**headers, "upload-checksum": f"blake3 {digest}"}) == 400
    assert refused("PATCH", ID, {**headers, "upload-checksum": "sha1 ***"}) == 400
    assert parse("DELETE", ID, V, max_size=MAX).kind == "delete"
    assert parse("POST", ID, {**V, "x-http-method-override": "HEAD"}, max_size=MAX).kind == "head"
    assert refused("PUT", ID, V) == 405
    assert refused("HEAD", "", V) == 405
    assert refused("HEAD", "../../etc/passwd", V) == 404


def test_answers_carry_the_protocol_headers() -> None:
    upload = Upload(ID, length=None, offset=7, metadata="a Yg==", expires=1_800_000_000)
    head = dict(tus.head_answer(upload).headers)
    assert head["Upload-Offset"] == "7" and head["Upload-Defer-Length"] == "1"
    assert head["Upload-Metadata"] == "a Yg==" and head["Cache-Control"] == "no-store"
    assert head["Upload-Expires"].endswith("GMT") and head["Tus-Resumable"] == "1.0.0"
    created = tus.created_answer("/files/" + ID, upload, with_body=True)
    assert created.status == 201 and dict(created.headers)["Location"] == "/files/" + ID
    assert tus.patched_answer(upload).status == 204


def test_a_request_names_the_node_holding_its_upload() -> None:
    # What the resolver routes by: the tag before the dot of the upload's id.
    assert tus.node_tag("web-1.example.com") == "web-1-example-com"
    assert tus.node_tag("") == "node"
    upload_id = "web1.AAAAAAAAAAAAAAAAAAAAAAAA"
    assert tus.holder("PATCH", upload_id, V) == "web1"
    assert tus.holder("HEAD", "/" + upload_id + "/", V) == "web1"
    assert tus.holder("POST", upload_id, {"x-http-method-override": "DELETE"}) == "web1"
    # A concatenation: where its first part is.
    final = {"upload-concat": f"final;/files/{upload_id} /files/web2.BBBBBBBBBBBBBBBBBBBB"}
    assert tus.holder("POST", "", final) == "web1"
    # No upload yet, or nothing the node's own app would not refuse.
    assert tus.holder("POST", "", V) is None
    assert tus.holder("OPTIONS", "", {}) is None
    assert tus.holder("POST", "", {"upload-concat": "final;"}) is None
    assert tus.holder("HEAD", "../../etc/passwd", V) is None
