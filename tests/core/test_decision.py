"""The resolver's routing rule, as a plain function."""

from __future__ import annotations

import dataclasses

import pytest

from qproxy.config import DEFAULT_INLINE_TYPES
from qproxy.core.decision import (
    FORBIDDEN,
    MISSING,
    MISSING_ANSWER,
    SAFE_TYPE,
    Decision,
    Shown,
    auth_answer,
    decide,
    peer_target,
    should_ask_s3,
    shown_as,
    x_accel,
)
from qproxy.core.record import FileRecord, State


def record(state: State, node: str = "n1", url: str = "http://10.0.0.1:8300") -> FileRecord:
    return FileRecord(
        key="k.txt",
        state=state,
        gen=3,
        node=node,
        node_url=url,
        filename="a.txt",
        content_type="text/plain",
    )


def run(
    rec: FileRecord | None, *, retry: bool = False, exists: bool = False
) -> tuple[str, str, str]:
    d = decide(
        rec,
        "k.txt",
        node_id="n1",
        remote_url=lambda name, shown, private: f"https://s3.example/{name}?sig",
        local_exists=lambda: exists,
        redirect_max_age=300,
        retry=retry,
    )
    return d.kind, d.peer, d.url


@pytest.mark.parametrize("state", ["local", "queued", "transferring", "failed"])
def test_local_states_serve_from_disk(state: State) -> None:
    assert run(record(state)) == ("local", "", "")


@pytest.mark.parametrize("state", ["local", "queued", "transferring", "failed"])
def test_other_node_is_a_peer(state: State) -> None:
    assert run(record(state, node="n2")) == ("peer", "10.0.0.1:8300", "")


def test_a_peer_target_names_the_bytes_by_their_hash() -> None:
    """nginx's --peer-cache keeps a peer's file by its SHA-256 (``h``), never by its key
    alone: a newer version under the key is other bytes."""
    sha = "ab" * 32
    rec = dataclasses.replace(record("local", node="n2"), sha256=sha)
    kw = {"node_id": "n1", "remote_url": lambda *a: "", "local_exists": lambda: False}
    d = decide(rec, "k.txt", redirect_max_age=300, **kw)  # type: ignore[arg-type]
    assert d.sha256 == sha
    assert peer_target(d, "exp=1&v=1&sig=x").endswith(f"?exp=1&v=1&sig=x&h={sha}")
    # No hash (a record of an older release): no h, and nginx keeps nothing.
    unhashed = dataclasses.replace(d, sha256="")
    assert peer_target(unhashed, "exp=1&v=1&sig=x").endswith("?exp=1&v=1&sig=x")
    bad = dataclasses.replace(rec, sha256="../etc")
    assert decide(bad, "k.txt", redirect_max_age=300, **kw).sha256 == ""  # type: ignore[arg-type]


def test_remote_redirects() -> None:
    assert run(record("remote")) == ("redirect", "", "https://s3.example/k.txt?sig")


@pytest.mark.parametrize("state", ["deleted", "pending"])
def test_gone_or_uncommitted_is_missing(state: State) -> None:
    assert run(record(state), exists=True)[0] == "missing"


def test_unknown_key_served_if_the_file_exists() -> None:
    assert run(None, exists=True)[0] == "local"
    assert run(None, exists=False)[0] == "missing"


def test_retry_after_a_vanished_local_file() -> None:
    assert run(record("remote"), retry=True)[0] == "redirect"
    assert run(record("queued"), retry=True)[0] == "missing"
    assert run(None, retry=True, exists=True)[0] == "missing"


def test_headers_come_from_metadata() -> None:
    d = decide(
        record("queued"),
        "k.txt",
        node_id="n1",
        remote_url=lambda name: "",
        local_exists=lambda: True,
        redirect_max_age=0,
    )
    assert d.content_type == "text/plain"
    assert d.disposition.startswith('inline; filename="a.txt"')


# -- rendering for nginx ---------------------------------------------------------------------


def headers(raw: list[tuple[bytes, bytes]]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in raw}


def test_x_accel_local_points_nginx_at_the_encoded_path() -> None:
    local = Decision("local", key="a b/ü?.txt", content_type="text/plain", disposition="inline")
    status, raw, body = x_accel(local, redirect_ttl=b"10")
    h = headers(raw)
    assert (status, body) == (200, b"")
    # nginx decodes the value once: encoded, '?' and spaces survive (DESIGN.md).
    assert h["x-accel-redirect"] == "/_qp/local/a%20b/%C3%BC%3F.txt"
    assert h["x-accel-expires"] == "1" and h["content-disposition"] == "inline"


def test_x_accel_peer_is_signed_and_redirects_are_cached_briefly() -> None:
    peer = Decision("peer", key="k.txt", peer="10.0.0.2:8300")
    _, raw, _ = x_accel(peer, redirect_ttl=b"10", signed_query="exp=1&sig=ab")
    assert headers(raw)["x-accel-redirect"] == "/_qp/peer/10.0.0.2:8300/k.txt?exp=1&sig=ab"
    status, raw, _ = x_accel(
        Decision("redirect", key="k", url="https://s3/k?X", max_age=300), redirect_ttl=b"10"
    )
    h = headers(raw)
    assert status == 302 and h["location"] == "https://s3/k?X"
    assert h["cache-control"] == "private, max-age=300" and h["x-accel-expires"] == "10"
    _, raw, _ = x_accel(Decision("redirect", key="k", url="https://s3/k"), redirect_ttl=b"10")
    assert headers(raw)["cache-control"] == "no-store"


def test_a_miss_is_one_prebuilt_404_never_cached() -> None:
    assert x_accel(MISSING, redirect_ttl=b"10") is MISSING_ANSWER
    status, raw, body = MISSING_ANSWER
    assert status == 404 and headers(raw)["x-accel-expires"] == "0"
    assert int(headers(raw)["content-length"]) == len(body)


def test_auth_answers_carry_the_branch_in_x_qp_headers() -> None:
    _, local = auth_answer(
        Decision("local", key="d/k.txt", disposition="inline"), redirect_ttl=b"10"
    )
    assert headers(local)["x-qp-path"] == "/d/k.txt"
    assert headers(local)["x-qp-disposition"] == "inline"
    _, peer = auth_answer(
        Decision("peer", key="k", peer="h:1"), redirect_ttl=b"10", signed_query="s=1"
    )
    assert headers(peer)["x-qp-peer"] == "/_qp/peer/h:1/k?s=1"
    _, remote = auth_answer(Decision("redirect", key="k", url="https://s3/k"), redirect_ttl=b"7")
    assert headers(remote)["x-qp-location"] == "https://s3/k"
    assert headers(remote)["x-accel-expires"] == "7"
    status, raw_missing = auth_answer(MISSING, redirect_ttl=b"7")
    assert status == 200
    missing = headers(raw_missing)
    assert not any(name.startswith("x-qp-") for name in missing)
    assert missing["x-accel-expires"] == "0"


def test_s3_is_asked_only_when_a_copy_may_be_there() -> None:
    gone = record("deleted")
    assert should_ask_s3(MISSING, None, retry=False)  # Redis lost the record
    assert should_ask_s3(MISSING, record("local"), retry=True)  # nginx found the file gone
    assert not should_ask_s3(MISSING, gone, retry=True)
    assert not should_ask_s3(MISSING, record("pending"), retry=True)
    assert not should_ask_s3(Decision("local", key="k"), None, retry=False)


# -- private files and what is shown inline -------------------------------------------------


def test_private_files_need_a_signature() -> None:
    private = FileRecord(key="k.txt", state="local", gen=1, node="n1", private=True)
    assert decide_with(private, signed=False).kind == "forbidden"
    allowed = decide_with(private, signed=True)
    assert allowed.kind == "local" and allowed.private
    status, raw, _ = x_accel(allowed, redirect_ttl=b"10")
    assert status == 200 and headers(raw)["x-accel-expires"] == "0"  # never micro-cached
    # By prefix, even with no record at all (Redis lost it).
    assert decide_with(None, signed=False, private_globs=("k.*",)).kind == "forbidden"
    status, raw, _ = x_accel(FORBIDDEN, redirect_ttl=b"10")
    assert status == 403 and headers(raw)["x-accel-expires"] == "0"
    assert auth_answer(FORBIDDEN, redirect_ttl=b"10")[0] == 403


def test_private_redirects_ask_for_a_short_url_and_no_client_cache() -> None:
    asked: list[bool] = []
    remote = FileRecord(key="k.txt", state="remote", gen=1, private=True)
    d = decide(
        remote,
        "k.txt",
        node_id="n1",
        remote_url=lambda name, shown, private: asked.append(private) or "https://s3/x",
        local_exists=lambda: False,
        redirect_max_age=300,
        signed=True,
    )
    assert asked == [True] and d.max_age == 0 and d.private


def decide_with(
    rec: FileRecord | None, *, signed: bool, private_globs: tuple[str, ...] = ()
) -> Decision:
    return decide(
        rec,
        "k.txt",
        node_id="n1",
        remote_url=lambda name, shown, private: "https://s3/x",
        local_exists=lambda: True,
        redirect_max_age=300,
        private_globs=private_globs,
        signed=signed,
    )


@pytest.mark.parametrize(
    ("ctype", "filename", "inline"),
    [
        ("image/png", "a.png", True),
        ("video/mp4", "a.mp4", True),
        ("application/pdf", "a.pdf", True),
        ("text/plain", "a.txt", True),
        ("text/html", "a.html", False),
        ("image/svg+xml", "a.svg", False),
        ("application/xml", "a.xml", False),
        ("application/javascript", "a.js", False),
        ("TEXT/HTML; charset=utf-8", "a", False),
    ],
)
def test_only_allowlisted_types_are_shown_inline(ctype: str, filename: str, inline: bool) -> None:
    shown = shown_as(ctype, filename, inline_types=DEFAULT_INLINE_TYPES)
    if inline:
        assert shown.content_type == ctype and shown.disposition.startswith("inline")
    else:
        assert shown == Shown(SAFE_TYPE, shown.disposition)
        assert shown.disposition.startswith("attachment")


def test_a_record_reads_the_same_from_short_and_long_field_names() -> None:
    from qproxy.core.record import FIELDS, encode_fields

    fields = {
        "state": "local",
        "gen": 4,
        "node": "web1",
        "node_url": "http://10.0.0.1:8300",
        "size": 17,
        "sha256": "ab" * 32,
        "filename": "é.txt",
        "content_type": "text/plain",
        "attempts": 2,
        "version": 3,
        "stale": "a~v1,a~v2",
        "meta": {"by": "me"},
        "private": True,
        "keep": 60,
        "hold": True,
    }
    flat = encode_fields(fields)
    short = {k.encode(): v.encode() for k, v in zip(flat[::2], flat[1::2], strict=True)}
    assert set(short) <= {v.encode() for v in FIELDS.values()}
    long_names = {
        name: short[code.encode()] for name, code in FIELDS.items() if code.encode() in short
    }
    a = FileRecord.from_hash("a", short)
    b = FileRecord.from_hash("a", {k.encode(): v for k, v in long_names.items()})
    assert a == b
    assert (a.state, a.gen, a.node_url, a.sha256, a.filename) == (
        "local",
        4,
        "http://10.0.0.1:8300",
        "ab" * 32,
        "é.txt",
    )
    assert (a.stale, a.meta, a.private, a.keep, a.hold, a.version) == (
        ("a~v1", "a~v2"),
        {"by": "me"},
        True,
        60.0,
        True,
        3,
    )
