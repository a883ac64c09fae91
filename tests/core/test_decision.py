"""The resolver's routing rule, as a plain function."""

from __future__ import annotations

import pytest

from qproxy.core.decision import decide
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
        remote_url=lambda name: f"https://s3.example/{name}?sig",
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
