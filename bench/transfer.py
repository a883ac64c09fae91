"""Transfer rows: the worker end to end against boto3's own upload (one big file, many small)."""

from __future__ import annotations

import os
import signal
import sys
import time

from bench.common import (
    Bench,
    MiB,
    Row,
)
from qproxy.compose import Stores
from qproxy.lifecycle.files import commit
from qproxy.stores.state import StateStore


def commit_copies(node: Stores, payload: bytes, count: int, prefix: str) -> list[str]:
    """``count`` files of ``payload`` committed as uploads are (their transfers queued)."""
    keys = []
    for _ in range(count):
        temp = node.local.create_temp()
        temp.write(payload)
        temp.close()
        key = prefix + os.urandom(6).hex() + ".bin"
        commit(node, temp, key, {"filename": "f.bin", "content_type": "application/octet-stream"})
        keys.append(key)
    return keys


def transfer_row(b: Bench) -> None:
    import boto3

    size = (8 if b.quick else 256) * MiB
    path = b.big_file(size)
    node = Stores(b.stack.config)
    s3 = boto3.client("s3", endpoint_url=b.stack.url("s3"), region_name="us-east-1")

    def cand() -> float:
        temp = node.local.create_temp()
        with open(path, "rb") as fh:
            while chunk := fh.read(MiB):
                temp.write(chunk)
        temp.close()
        key = "bench/t-" + os.urandom(6).hex() + ".bin"
        started = time.monotonic()
        commit(node, temp, key, {"filename": "t.bin", "content_type": "application/octet-stream"})
        while (rec := node.state.get(key)) is None or rec.state != "remote":
            time.sleep(0.02)
        rate = size / MiB / (time.monotonic() - started)
        s3.delete_object(Bucket="qproxy-dev", Key=key)
        node.local.remove(key)
        return rate

    def base() -> float:
        started = time.monotonic()
        s3.upload_file(str(path), "qproxy-dev", "bench/raw")
        rate = size / MiB / (time.monotonic() - started)
        s3.delete_object(Bucket="qproxy-dev", Key="bench/raw")
        return rate

    b.alternate(
        Row(
            f"transfer {size // MiB} MiB to S3",
            "MiB/s",
            "worker end to end (queue -> verified -> remote)",
            "boto3 upload_file",
            target=">= 0.8x boto3",
            target_ratio=0.8,
        ),
        cand,
        base,
    )


def transfer_many_row(b: Bench) -> None:
    """Many small files: the worker pool end to end against a put_object loop."""
    from concurrent.futures import ThreadPoolExecutor

    import boto3

    count = 40 if b.quick else 1000
    width = b.stack.worker_concurrency
    node = Stores(b.stack.config)
    s3 = boto3.client("s3", endpoint_url=b.stack.url("s3"), region_name="us-east-1")
    payload = os.urandom(64 * 1024)
    worker = b.stack.services["worker"]

    def cand() -> float:
        keys = []
        worker.signal(signal.SIGSTOP)  # queue them all first: measure the pool, not intake
        try:
            keys = commit_copies(node, payload, count, "bench/many-")
        finally:
            started = time.monotonic()
            worker.signal(signal.SIGCONT)
        pending = list(keys)
        while pending:
            states = StateStore.from_url(b.stack.config.redis_url).states(pending)
            pending = [k for k, st in zip(pending, states, strict=True) if st != "remote"]
            time.sleep(0.05)
        rate = count / (time.monotonic() - started)
        for key in keys:
            s3.delete_object(Bucket="qproxy-dev", Key=key)
            node.local.remove(key)
        return rate

    def base() -> float:
        names = [f"bench/raw-{i}" for i in range(count)]
        started = time.monotonic()
        with ThreadPoolExecutor(width) as pool:
            list(pool.map(lambda n: s3.put_object(Bucket="qproxy-dev", Key=n, Body=payload), names))
        rate = count / (time.monotonic() - started)
        for name in names:
            s3.delete_object(Bucket="qproxy-dev", Key=name)
        return rate

    b.alternate(
        Row(
            f"transfer {count:,} files of 64 KiB",
            "files/s",
            f"worker pool ({width} processes), end to end",
            f"put_object loop, {width} threads",
            target=">= 0.7x",
            target_ratio=0.7,
        ),
        cand,
        base,
    )


def peer_pull_row(b: Bench) -> None:
    """Workers on another host: 1, 2 and 4 processes pulling each file from its web node's
    resolver over signed HTTP, against the same workers reading it from their own disk."""
    import boto3

    count, size = (4, MiB) if b.quick else (24, 16 * MiB)
    node = Stores(b.stack.config)
    s3 = boto3.client("s3", endpoint_url=b.stack.url("s3"), region_name="us-east-1")
    payload = os.urandom(size)
    elsewhere = b.tmp / "elsewhere"  # a worker host's (empty) disk
    elsewhere.mkdir(exist_ok=True)

    def run(width: int, root: str) -> float:
        # The stack's own worker stops; one with ``width`` processes and ``root`` as its
        # disk takes the queue (another node's id: it pulls what is not on its disk).
        name = f"bench-worker-{width}-{os.urandom(2).hex()}"
        argv = [
            sys.executable, "-m", "qproxy", "worker", "--concurrency", str(width),
            "--without-gossip", "--without-mingle", "--without-heartbeat",
            "--hostname", f"{name}@%h",
        ]  # fmt: skip
        env = {"QPROXY_LOCAL_ROOT": root, "QPROXY_NODE_ID": "worker-host"}
        keys = []
        # Stopped, not paused: Redis hands a job to a paused worker's pending BRPOP.
        b.stack.services.pop("worker").stop()
        worker = b.stack.spawn(name, argv, env=env)
        try:
            b.stack.wait_for(name, lambda: b"ready." in worker.log_path.read_bytes(), 60)
            worker.signal(signal.SIGSTOP)  # queue them all first: measure the pulls
            keys = commit_copies(node, payload, count, "bench/pull-")
            started = time.monotonic()
            worker.signal(signal.SIGCONT)
            pending = list(keys)
            while pending:
                states = node.state.states(pending)
                pending = [k for k, st in zip(pending, states, strict=True) if st != "remote"]
                time.sleep(0.02)
            rate = count * size / MiB / (time.monotonic() - started)
        finally:
            b.stack.services.pop(name).stop()
            b.stack.start_worker()
        for key in keys:
            s3.delete_object(Bucket="qproxy-dev", Key=key)
            node.local.remove(key)
        return rate

    # (a smoke run starts 2 workers a width: the ends are enough to keep the row alive)
    for width in (1, 4) if b.quick else (1, 2, 4):
        b.alternate(
            Row(
                f"peer pull, {width} worker process{'es' if width > 1 else ''}",
                "MiB/s",
                f"{count} x {size // MiB} MiB pulled from the web node's resolver",
                "the same read from the worker's own disk",
                target="information (no target)",
            ),
            lambda w=width: run(w, str(elsewhere)),  # type: ignore[misc]
            lambda w=width: run(w, str(b.stack.config.local_path)),  # type: ignore[misc]
            rounds=1 if b.quick else 2,
        )
