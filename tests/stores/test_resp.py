"""The resolver's pipelined Redis reader against a real redis-server: answers in order under
concurrency, a frozen Redis fails within the timeout, a restarted one is reconnected."""

from __future__ import annotations

import asyncio
import os
import select
import signal
import subprocess
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
import redis

from qproxy.dev.devstack import Stack, find_redis, free_port
from qproxy.errors import StateUnavailable
from qproxy.stores.resp import PipelinedRedis
from qproxy.stores.state import AsyncStateReader


def _start(port: int, *options: str) -> subprocess.Popen[bytes]:
    redis_server = find_redis()
    assert redis_server, "redis-server is not installed"
    proc = subprocess.Popen(
        [redis_server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", *options],
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            with redis.Redis(port=port) as client:
                client.ping()
            return proc
        except redis.ConnectionError:
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)


@pytest.fixture
def server() -> Iterator[tuple[int, list[subprocess.Popen[bytes]]]]:
    port = free_port()
    procs = [_start(port)]
    yield port, procs
    for proc in procs:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
            proc.wait()


def test_concurrent_answers_reach_their_callers(server: tuple[int, list[object]]) -> None:
    port, _ = server
    client = redis.Redis(port=port)
    for i in range(200):
        client.hset(f"qp:f:k{i}", mapping={"state": "local", "gen": str(i), "size": str(i * 7)})

    async def main() -> None:
        reader = AsyncStateReader(f"redis://127.0.0.1:{port}/0")
        records = await asyncio.gather(*(reader.get(f"k{i % 250}") for i in range(1000)))
        for i, record in enumerate(records):
            if i % 250 >= 200:
                assert record is None
            else:
                assert record is not None and record.key == f"k{i % 250}"
                assert record.gen == i % 250 and record.size == (i % 250) * 7
        with pytest.raises(Exception, match="WRONGTYPE"):
            client.set("plain", "x")
            await reader.redis.call("HGETALL", "plain")
        await reader.redis.close()

    asyncio.run(main())
    client.close()


def test_frozen_redis_fails_in_time_and_restart_reconnects(
    server: tuple[int, list[subprocess.Popen[bytes]]],
) -> None:
    port, procs = server
    with redis.Redis(port=port) as client:
        client.hset("qp:f:a", mapping={"state": "remote", "gen": "1"})

    async def main() -> None:
        reader = AsyncStateReader(f"redis://127.0.0.1:{port}/0")
        reader.redis = PipelinedRedis(f"redis://127.0.0.1:{port}/0", timeout=1.0)
        assert (await reader.get("a")) is not None

        os.kill(procs[0].pid, signal.SIGSTOP)  # Redis alive but silent
        started = time.monotonic()
        with pytest.raises(StateUnavailable):
            await reader.get("a")
        assert time.monotonic() - started < 3, "a frozen Redis held the request too long"
        os.kill(procs[0].pid, signal.SIGCONT)

        procs[0].kill()
        procs[0].wait()
        with pytest.raises(StateUnavailable):
            await reader.get("a")
        procs.append(_start(port))  # a new, empty Redis on the same address
        assert await reader.get("a") is None
        with redis.Redis(port=port) as client:
            client.hset("qp:f:a", mapping={"state": "remote", "gen": "2"})
        record = await reader.get("a")
        assert record is not None and record.gen == 2
        await reader.redis.close()

    asyncio.run(main())


def test_password_and_database_from_the_url(
    server: tuple[int, list[subprocess.Popen[bytes]]],
) -> None:
    port, _ = server
    with redis.Redis(port=port) as admin:
        admin.config_set("requirepass", "s3cret")
    with redis.Redis(port=port, password="s3cret", db=3) as authed:
        authed.hset("qp:f:db3", mapping={"state": "local", "gen": "5"})

    async def main() -> None:
        good = PipelinedRedis(f"redis://:s3cret@127.0.0.1:{port}/3")
        assert await good.call("HGET", "qp:f:db3", "gen") == b"5"
        await good.close()
        bad = PipelinedRedis(f"redis://:wrong@127.0.0.1:{port}/3")
        with pytest.raises(StateUnavailable, match="refused"):
            await bad.call("PING")

    asyncio.run(main())


def test_one_client_serves_event_loops_in_several_threads(
    server: tuple[int, list[subprocess.Popen[bytes]]],
) -> None:
    import threading

    port, _ = server
    with redis.Redis(port=port) as client:
        for i in range(50):
            client.set(f"k{i}", str(i))
    shared = PipelinedRedis(f"redis://127.0.0.1:{port}/0")
    results: dict[int, list[bytes]] = {}

    async def run(n: int) -> None:
        results[n] = list(await asyncio.gather(*(shared.call("GET", f"k{i}") for i in range(50))))
        await shared.close()

    threads = [threading.Thread(target=asyncio.run, args=(run(n),)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(results) == [0, 1, 2]
    for values in results.values():
        assert values == [str(i).encode() for i in range(50)]


def test_a_service_that_is_not_redis_is_refused_quickly(stack: Stack) -> None:
    # The S3 endpoint (an HTTP server) where Redis was expected: garbage, not a hang.
    port = urlsplit(stack.url("s3")).port

    async def main() -> None:
        client = PipelinedRedis(f"redis://127.0.0.1:{port}/0", timeout=3)
        started = time.monotonic()
        with pytest.raises(StateUnavailable):
            await client.call("HGETALL", "qp:f:x")
        assert time.monotonic() - started < 2.5

    asyncio.run(main())


def _hgetalls(port: int) -> int:
    """How many HGETALLs this Redis has answered."""
    with redis.Redis(port=port) as client:
        stats = client.info("commandstats")
    return int(stats.get("cmdstat_hgetall", {}).get("calls", 0))


def test_a_remembered_record_is_seen_changed_by_the_next_read(
    server: tuple[int, list[subprocess.Popen[bytes]]],
) -> None:
    """Records are remembered (a hot key asks Redis once), and whoever changes one (another
    process: a worker, `qproxy delete`), the next read after the change sees it."""
    port, _ = server
    client = redis.Redis(port=port)
    client.hset("qp:f:hot", mapping={"s": "remote", "g": "1"})

    async def main() -> None:
        reader = AsyncStateReader(f"redis://127.0.0.1:{port}/0")
        first = await reader.get("hot")
        before = _hgetalls(port)
        for _ in range(100):
            assert await reader.get("hot") == first
        assert _hgetalls(port) == before, "a remembered record was asked for again"
        # Changed by another client, read at once (no turn of the event loop between):
        # never the remembered one.
        for gen in range(2, 300):
            client.hset("qp:f:hot", "g", str(gen))
            record = await reader.get("hot")
            assert record is not None and record.gen == gen
            assert await reader.get("hot") == record
        client.delete("qp:f:hot")
        assert await reader.get("hot") is None
        client.hset("qp:f:hot", mapping={"s": "local", "g": "9"})  # a record that was absent
        record = await reader.get("hot")
        assert record is not None and record.state == "local"
        client.flushall()  # (Redis names no keys: everything is forgotten)
        # Unlike a key's, FLUSHALL's invalidation can leave Redis after its answer (measured
        # on loopback: 4 reads of 3,000 straight after the answer saw the old record; 0 of
        # 20,000 after an HSET's): the read comes once it is on the reader's socket.
        (protocol,) = reader.redis._protocols.values()
        assert protocol.subscriber is not None
        select.select([protocol.subscriber.fd], [], [], 5)
        assert await reader.get("hot") is None
        await reader.redis.close()

    asyncio.run(main())
    client.close()


def test_a_lost_invalidation_connection_forgets_every_record(
    server: tuple[int, list[subprocess.Popen[bytes]]],
) -> None:
    port, _ = server
    client = redis.Redis(port=port)
    client.hset("qp:f:k", mapping={"s": "remote", "g": "1"})

    async def main() -> None:
        reader = AsyncStateReader(f"redis://127.0.0.1:{port}/0")
        assert (await reader.get("k")).gen == 1  # type: ignore[union-attr]
        # The connection the invalidations come on is cut, then the record changes: no
        # one would say so, so nothing remembered is used (and the read still works).
        assert client.client_kill_filter(_type="pubsub") == 1
        client.hset("qp:f:k", "g", "2")
        assert (await reader.get("k")).gen == 2  # type: ignore[union-attr]
        # Tracked again on the new connections.
        before = _hgetalls(port)
        await reader.get("k")
        assert _hgetalls(port) == before
        client.hset("qp:f:k", "g", "3")
        assert (await reader.get("k")).gen == 3  # type: ignore[union-attr]
        await reader.redis.close()

    asyncio.run(main())
    client.close()


def test_a_redis_without_client_tracking_is_asked_every_time() -> None:
    """A Redis that refuses CLIENT (renamed away, an ACL, a proxy) still serves reads."""
    port = free_port()
    proc = _start(port, "--rename-command", "CLIENT", "")
    try:
        with redis.Redis(port=port) as client:
            client.hset("qp:f:k", mapping={"s": "remote", "g": "1"})

        async def main() -> None:
            reader = AsyncStateReader(f"redis://127.0.0.1:{port}/0")
            for gen in (1, 1, 1):
                assert (await reader.get("k")).gen == gen  # type: ignore[union-attr]
            assert _hgetalls(port) == 3
            await reader.redis.close()

        asyncio.run(main())
    finally:
        proc.kill()
        proc.wait()
