"""Transfer rows: the worker end to end against boto3's own upload (one big file, many small)."""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    Bench,
    MiB,
    Row,
)
from qproxy.compose import Stores
from qproxy.core.record import State
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


# The states a committed file passes through on its way to remote (each has an index).
ON_THE_WAY: tuple[State, ...] = ("local", "queued", "transferring")


def on_the_way(state: StateStore) -> int:
    """How many records are not yet remote (nor failed): one round trip, ~0.1 ms."""
    return sum(count for count, _ in state.census(ON_THE_WAY).values())


def wait_remote(state: StateStore, keys: list[str], *, others: int) -> None:
    """Until every one of ``keys`` is remote; ``others``: how many records were on the way
    before they were committed (:func:`on_the_way`). Watched by those counts, then checked
    key by key: asking the state of 1,000 keys costs this process ~9 ms of CPU, which
    polled every 50 ms took ~10% of a core from the worker being measured."""
    while on_the_way(state) > others:
        time.sleep(0.01)
    pending = keys
    while pending:
        states = state.states(pending)
        failed = [k for k, st in zip(pending, states, strict=True) if st == "failed"]
        if failed:
            raise AssertionError(f"{len(failed)} transfers failed, {failed[0]} among them")
        pending = [k for k, st in zip(pending, states, strict=True) if st != "remote"]
        if pending:
            time.sleep(0.01)


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
        others = on_the_way(node.state)
        started = time.monotonic()
        commit(node, temp, key, {"filename": "t.bin", "content_type": "application/octet-stream"})
        wait_remote(node.state, [key], others=others)  # (raises if it failed: no endless wait)
        rate = size / MiB / (time.monotonic() - started)
        s3.delete_object(Bucket="qproxy-dev", Key=key)
        node.local.remove(key)
        return rate

    def base(extra: dict[str, str] | None = None) -> float:
        started = time.monotonic()
        s3.upload_file(str(path), "qproxy-dev", "bench/raw", ExtraArgs=extra)
        rate = size / MiB / (time.monotonic() - started)
        s3.delete_object(Bucket="qproxy-dev", Key="bench/raw")
        return rate

    b.alternate(
        Row(
            f"transfer {size // MiB} MiB to S3",
            "MiB/s",
            "worker end to end (queue -> verified -> remote)",
            "boto3 upload_file",
            target=">= 0.95x boto3",
            target_ratio=0.95,
            note="the worker sends a SHA-256 of every part, which S3 checks; plain "
            "upload_file sends a CRC32 (see the next row for the same guarantee)",
        ),
        cand,
        base,
    )
    # What the worker promises (every byte checked by S3 against a SHA-256): boto3 asked
    # for the same.
    b.alternate(
        Row(
            f"transfer {size // MiB} MiB to S3, same checksums",
            "MiB/s",
            "worker end to end (queue -> verified -> remote)",
            "boto3 upload_file, ChecksumAlgorithm SHA256",
            target=">= 0.95x boto3",
            target_ratio=0.95,
        ),
        cand,
        lambda: base({"ChecksumAlgorithm": "SHA256"}),
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
        others = on_the_way(node.state)
        worker.signal(signal.SIGSTOP)  # queue them all first: measure the pool, not intake
        try:
            keys = commit_copies(node, payload, count, "bench/many-")
        finally:
            started = time.monotonic()
            worker.signal(signal.SIGCONT)
        wait_remote(node.state, keys, others=others)
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
            f"qproxy worker ({width} threads), end to end",
            f"put_object loop, {width} threads",
            target=">= 0.9x",
            target_ratio=0.9,
        ),
        cand,
        base,
    )


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) of process ``pid`` and its children so far."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        if proc.name == str(pid) or fields[1] == str(pid):
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


@dataclass
class PoolRun:
    seconds: float  # from the first job taken to the last file remote
    cpu: float  # the worker's CPU seconds (every process of it) over that time


def pool_run(
    b: Bench,
    payload: bytes,
    count: int,
    *,
    args: list[str],
    env: dict[str, str] | None = None,
    warm: int = 0,
) -> PoolRun:
    """``count`` files of ``payload`` queued while a ``qproxy worker ARGS`` of its own is
    stopped, then taken by it to remote: its wall time and CPU. The stack's own worker
    makes way meanwhile. ``warm`` files go first, unmeasured (a process's first transfer
    imports and connects)."""
    node = Stores(b.stack.config)
    name = f"bench-worker-{os.urandom(3).hex()}"
    argv = [
        sys.executable, "-m", "qproxy", "worker", *args,
        "--without-gossip", "--without-mingle", "--without-heartbeat",
        "--hostname", f"{name}@%h",
    ]  # fmt: skip
    keys: list[str] = []
    # Stopped, not paused: Redis hands a job to a paused worker's pending BRPOP.
    b.stack.services.pop("worker").stop()
    worker = b.stack.spawn(name, argv, env=env)
    try:
        b.stack.wait_for(name, lambda: b"ready." in worker.log_path.read_bytes(), 60)
        if warm:
            keys = commit_copies(node, payload, warm, "bench/pool-")
            b.stack.wait_for(name, lambda: set(node.state.states(keys)) == {"remote"}, 60)
        worker.signal(signal.SIGSTOP)  # queue them all first: measure the pool
        others = on_the_way(node.state)
        keys += commit_copies(node, payload, count, "bench/pool-")
        cpu = tree_cpu_seconds(worker.process.pid)
        started = time.monotonic()
        worker.signal(signal.SIGCONT)
        wait_remote(node.state, keys[warm:], others=others)
        run = PoolRun(time.monotonic() - started, tree_cpu_seconds(worker.process.pid) - cpu)
    finally:
        b.stack.services.pop(name).stop()
        b.stack.start_worker()
    s3 = boto3_client(b)
    for key in keys:
        s3.delete_object(Bucket="qproxy-dev", Key=key)
        node.local.remove(key)
    return run


def boto3_client(b: Bench) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=b.stack.url("s3"), region_name="us-east-1")


def worker_cpu_row(b: Bench) -> None:
    """The worker's CPU seconds per 1 MiB file end to end (queue -> verified -> remote):
    qproxy worker's pool (threads) against Celery's prefork pool, the default before."""
    count = 20 if b.quick else 300
    payload = os.urandom(MiB)
    width = str(b.stack.worker_concurrency)

    def ms_per_file(pool: str) -> float:
        return (
            pool_run(b, payload, count, args=["--concurrency", width, "--pool", pool], warm=10).cpu
            * 1000
            / count
        )

    b.alternate(
        Row(
            f"worker CPU per 1 MiB file ({count} files, end to end)",
            "ms CPU/file",
            f"qproxy worker (Celery threads, {width})",
            f"Celery prefork ({width} processes)",
            higher_is_better=False,
            target="<= 0.5x prefork (halve it)",
            target_ratio=0.5,
        ),
        lambda: ms_per_file("threads"),
        lambda: ms_per_file("prefork"),
    )


def peer_pull_row(b: Bench) -> None:
    """Workers on another host: 1, 2 and 4 processes pulling each file from its web node's
    resolver over signed HTTP, against the same workers reading it from their own disk."""
    count, size = (4, MiB) if b.quick else (24, 16 * MiB)
    payload = os.urandom(size)
    elsewhere = b.tmp / "elsewhere"  # a worker host's (empty) disk
    elsewhere.mkdir(exist_ok=True)

    def rate(width: int, root: str) -> float:
        # Another node's id: it pulls what is not on its disk.
        env = {"QPROXY_LOCAL_ROOT": root, "QPROXY_NODE_ID": "worker-host"}
        args = ["--concurrency", str(width), "--pool", "prefork"]
        return count * size / MiB / pool_run(b, payload, count, args=args, env=env).seconds

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
            lambda w=width: rate(w, str(elsewhere)),  # type: ignore[misc]
            lambda w=width: rate(w, str(b.stack.config.local_path)),  # type: ignore[misc]
            rounds=1 if b.quick else 2,
        )
