"""The transfer rows' clock stops when the last file is remote: not before, and a failed
transfer stops the row with its error instead of waiting for ever."""

from __future__ import annotations

import threading
import time

import pytest

from bench.transfer import on_the_way, wait_remote
from qproxy.compose import Stores
from qproxy.worker.transfer import transfer
from tests.conftest import put_local


def test_wait_remote_returns_once_every_file_is_remote(quiet_node: Stores) -> None:
    others = on_the_way(quiet_node.state)
    keys = [put_local(quiet_node, b"on its way %d" % i) for i in range(3)]
    done: list[str] = []

    def transfer_slowly() -> None:
        for key in keys:
            time.sleep(0.2)
            done.append(transfer(quiet_node, key))

    mover = threading.Thread(target=transfer_slowly)
    mover.start()
    try:
        wait_remote(quiet_node.state, keys, others=others)
        assert quiet_node.state.states(keys) == ["remote"] * 3
    finally:
        mover.join()
    # (after the join: the record turns remote inside transfer(), before it returns)
    assert done == ["remote"] * 3


def test_wait_remote_raises_on_a_failed_transfer(quiet_node: Stores) -> None:
    others = on_the_way(quiet_node.state)
    good = put_local(quiet_node, b"fine")
    bad = put_local(quiet_node, b"soon gone")
    quiet_node.local.remove(bad)
    assert transfer(quiet_node, good) == "remote"
    assert transfer(quiet_node, bad, attempts_left=1) == "failed"
    with pytest.raises(AssertionError, match=f"1 transfers failed, {bad} among them"):
        wait_remote(quiet_node.state, [good, bad], others=others)
