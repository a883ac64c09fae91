"""The worker's kombu guard: only in the worker, only for a connection that is gone."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from typing import Any

import pytest
import redis
from kombu.transport import redis as kombu_redis

from qproxy.dev.devstack import Stack
from qproxy.stores.queue import celery_app
from qproxy.worker.app import default_pool, harden_kombu, reuse_kombu_clients


class _GoneConnection:
    """A kombu QoS whose connection went away: its index pipeline is an attribute of None."""

    connection: Any = None

    def _remove_from_indices(self, tag: str) -> Any:
        return self.connection.hostname  # AttributeError on None, as kombu 5.x raises it


class _Bug:
    """Any other AttributeError is a bug, and must surface."""

    def _remove_from_indices(self, tag: str) -> Any:
        raise AttributeError("'QoS' object has no attribute 'typo'", name="typo", obj=self)


def test_the_guard_swallows_only_a_gone_connection() -> None:
    assert harden_kombu() is True
    assert harden_kombu() is True  # once only
    kombu_redis.QoS.ack(_GoneConnection(), "tag")  # type: ignore[arg-type]  # swallowed
    with pytest.raises(AttributeError, match="typo"):
        kombu_redis.QoS.ack(_Bug(), "tag")  # type: ignore[arg-type]


def test_web_nodes_and_doctor_leave_kombu_alone() -> None:
    # A web node sends jobs (the queue client) and doctor asks for workers: neither patches.
    code = (
        "from qproxy.config import Config\n"
        "from qproxy.compose import Stores\n"
        "from qproxy.ops.doctor import check_workers\n"
        "from kombu.transport import redis as k\n"
        "stores = Stores(Config(s3_bucket='b', redis_url='redis://127.0.0.1:1/0'))\n"
        "stores.queue\n"
        "check_workers(stores.config)\n"
        "print(getattr(k.QoS, '_qproxy_hardened', False),"
        " getattr(k.Channel, '_qproxy_reuses_clients', False))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=os.environ
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False False"


def test_kombu_builds_one_redis_client_a_channel_not_one_a_message(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kombu's Redis channel built a redis-py client (~150 us of CPU) for each publish,
    each delivery's unacked record and each ack. In the worker it keeps one; the messages
    still come and go as they did: each taken once, acked, none left unacked."""
    built = []
    original = redis.Redis.__init__

    def counting(self: redis.Redis, *args: Any, **kwargs: Any) -> None:
        built.append(1)
        original(self, *args, **kwargs)

    assert reuse_kombu_clients() is True
    assert reuse_kombu_clients() is True  # once only
    monkeypatch.setattr(redis.Redis, "__init__", counting)
    name = f"qproxy-test-{os.urandom(4).hex()}"
    with celery_app(stack.config).connection_for_write() as conn:
        queue = conn.SimpleQueue(name)
        for i in range(20):
            queue.put({"n": i})
        taken = []
        for _ in range(20):
            message = queue.get(timeout=5)
            taken.append(message.payload["n"])
            message.ack()
        assert taken == list(range(20))
        with pytest.raises(queue.Empty):
            queue.get(block=False)  # each taken once
        unacked = redis.Redis.from_url(stack.config.redis_url).hlen("unacked")
        queue.close()
    assert unacked == 0
    assert len(built) <= 3, f"{len(built)} redis clients built for 20 messages"


def test_the_worker_runs_celerys_thread_pool_unless_told_otherwise(stack: Stack) -> None:
    # The stack's `qproxy worker --concurrency 2` (every transfer of the suite ran on it).
    banner = stack.services["worker"].log_path.read_text(errors="replace")
    assert "concurrency: 2 (thread)" in banner, banner[:2000]
    assert default_pool(["--concurrency", "8"]) == ["--pool", "threads"]
    # `qproxy worker --pool NAME` (in its --help) runs that pool.
    argv = [sys.executable, "-m", "qproxy", "worker", "--pool", "solo", "--hostname", "solo@%h"]
    solo = stack.spawn("worker-solo", argv)
    try:
        stack.wait_for("worker-solo", lambda: b"ready." in solo.log_path.read_bytes(), 60)
        assert re.search(rb"concurrency: \d+ \(solo\)", solo.log_path.read_bytes())
    finally:
        stack.services.pop("worker-solo").stop()
    for named in (["--pool", "prefork"], ["--pool=solo"], ["-P", "gevent"], ["-Pprefork"]):
        assert default_pool(named) == [], named
