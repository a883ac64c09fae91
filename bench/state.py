"""State at scale: Redis memory per record and the cost of a sweep among a million records."""

from __future__ import annotations

import hashlib
import time

from bench.common import (
    Bench,
    Row,
)
from qproxy.compose import Stores
from qproxy.dev.devstack import free_port
from qproxy.stores.state import StateStore
from qproxy.worker.sweep import requeue_stuck


def state_row(b: Bench) -> None:
    import redis as redis_lib

    n = 20_000 if b.quick else 1_000_000
    stuck = 100 if b.quick else 1000
    port = free_port()
    data = b.tmp / "redis-scale"
    data.mkdir(exist_ok=True)
    b.stack.spawn(
        "redis-scale",
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(data),
            "--save",
            "",
            "--appendonly",
            "no",
        ],
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis_lib.Redis.from_url(url)
    b.stack.wait_for("redis-scale", lambda: bool(client.ping()))
    state = StateStore.from_url(url)
    node = Stores(b.stack.config.replace(redis_url=url), state=state, queue=_NullQueue())
    before = int(client.info("memory")["used_memory"])
    now = time.time()
    # The fields a real upload's record has: written by the commit, then changed by the
    # worker (transferring, remote) and the origin's drop of its copy.
    fields = {
        "node": "node-1",
        "node_url": "http://10.0.0.1:8300",
        "size": 123456,
        "sha256": hashlib.sha256(b"x").hexdigest(),
        "has_local": True,
        "filename": "holiday-photo.jpg",
        "content_type": "image/jpeg",
    }
    done = {
        "lease": "",
        "lease_until": "",
        "error": "",
        "attempts": 1,
        "remote_at": now,
        "has_remote": True,
        "node_url": "",
        "has_local": False,
    }
    batch = 2000
    for start in range(0, n, batch):
        with state.bulk() as bulk:
            for i in range(start, min(n, start + batch)):
                key = f"2026/11/26/{i:024d}.jpg"
                if i < stuck:
                    bulk.create(key, "queued", fields, now=now - 3600)
                    continue
                bulk.create(key, "local", fields, now=now)
                bulk.transition(key, "remote", fields=done, now=now)
    after = int(client.info("memory")["used_memory"])
    per_record = (after - before) / n
    started = time.monotonic()
    requeued = requeue_stuck(node, older_than=now - 600, now=now, limit=stuck * 2)
    sweep_s = time.monotonic() - started
    assert requeued == stuck, requeued
    row = Row(
        f"state at scale ({n:,} records, {stuck:,} stuck)",
        "B/record",
        "Redis memory per record",
        "-",
        cand=[per_record],
        higher_is_better=False,
        target="<= 300 B/record; sweep <= 1 s",
    )
    row.note = (
        f"sweep of the stuck: {sweep_s * 1000:.0f} ms ({'met' if sweep_s <= 1 else 'MISSED'}); "
        f"memory {'met' if per_record <= 300 else 'MISSED'}"
    )
    b.rows.append(row)
    print(f"  {row.name}: {per_record:.0f} B/record, sweep {sweep_s * 1000:.0f} ms", flush=True)
    b.stop("redis-scale")


class _NullQueue:
    def enqueue_transfer(self, key: str, gen: int) -> None:
        pass

    def enqueue_delete(self, key: str, gen: int) -> None:
        pass
