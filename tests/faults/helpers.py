"""The fault suite's tools: a fresh stack per case, a load of uploads, a prober, the oracle.

Every case uploads through the real stack (nginx -> middleware -> disk -> Celery -> moto),
breaks something for real, and ends with :func:`oracle`: every upload that got a 2xx is
``remote``, its S3 object reads back with the client's sha256 and size, there are no other
objects and no open multipart uploads, no temp file is left, and the resolver never
answered 5xx.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import boto3
import httpx

from qproxy.compose import Stores
from qproxy.dev.devstack import Stack
from tests.conftest import _stack

KiB, MiB = 1024, 1024 * 1024

# Timings shrunk so each case fits in seconds: stuck transfers are queued again after 3 s,
# the cluster sweep runs every 2 s, leases last 20 s.
FAULT_SETTINGS = {
    "QPROXY_STUCK_SECONDS": "3",
    "QPROXY_SWEEP_INTERVAL": "2",
    "QPROXY_JANITOR_INTERVAL": "0.5",
    "QPROXY_LEASE_SECONDS": "20",
    "QPROXY_VISIBILITY_TIMEOUT": "60",
    "QPROXY_RETRY_BACKOFF": "0.3",
    "QPROXY_RETRY_BACKOFF_MAX": "3",
    "QPROXY_TRANSFER_RETRIES": "100",
    "QPROXY_MULTIPART_MAX_AGE": "30",
}


def fault_stack(**settings: str) -> Stack:
    return _stack(**{**FAULT_SETTINGS, **settings})


@dataclass
class Accepted:
    """Uploads the stack answered with a 2xx: the ones that must never be lost."""

    files: dict[str, tuple[str, int]] = field(default_factory=dict)  # key -> (sha256, size)
    refused: Counter[int] = field(default_factory=Counter)
    errors: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def keys(self) -> list[str]:
        with self.lock:
            return list(self.files)


def sizes(n: int, low: int = KiB, high: int = 4 * MiB, seed: int = 7) -> list[int]:
    """Log-uniform sizes from ``low`` to ``high``: many small files, some large."""
    rnd = random.Random(seed)
    return [int(math.exp(rnd.uniform(math.log(low), math.log(high)))) for _ in range(n)]


def upload_one(stack: Stack, size: int, accepted: Accepted, client: httpx.Client) -> str | None:
    data = os.urandom(size)
    try:
        r = client.post(stack.front + "/upload", files={"file": (f"f{size}.bin", data)})
    except httpx.HTTPError:
        with accepted.lock:
            accepted.errors += 1
        return None
    if r.status_code >= 300:
        with accepted.lock:
            accepted.refused[r.status_code] += 1
        return None
    key = str(r.json()["keys"][0])
    with accepted.lock:
        accepted.files[key] = (hashlib.sha256(data).hexdigest(), size)
    return key


def upload_many(
    stack: Stack, all_sizes: list[int], accepted: Accepted, *, workers: int = 4, pause: float = 0.0
) -> None:
    def run(chunk: list[int]) -> None:
        with httpx.Client(timeout=60) as client:
            for size in chunk:
                upload_one(stack, size, accepted, client)
                if pause:
                    time.sleep(pause)

    chunks = [all_sizes[i::workers] for i in range(workers)]
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(run, chunks))


class Prober:
    """GETs accepted files through nginx all along and remembers every status."""

    def __init__(self, stack: Stack, accepted: Accepted) -> None:
        self.stack = stack
        self.accepted = accepted
        self.statuses: Counter[int] = Counter()
        self.bad: list[tuple[str, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        rnd = random.Random(1)
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set():
                keys = self.accepted.keys()
                if not keys:
                    time.sleep(0.05)
                    continue
                key = rnd.choice(keys)
                try:
                    r = client.head(f"{self.stack.files_url}/media/{key}")
                except httpx.HTTPError:
                    continue
                self.statuses[r.status_code] += 1
                if r.status_code >= 400:
                    self.bad.append((key, r.status_code))
                time.sleep(0.02)

    def __enter__(self) -> Prober:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


@contextmanager
def running(stack: Stack, name: str, every: float, action: object) -> Iterator[None]:
    """Do ``action()`` every ``every`` seconds in the background while the block runs."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(every):
            action()  # type: ignore[operator]

    thread = threading.Thread(target=loop, name=name, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(60)


def wait_all_remote(stack: Stack, keys: list[str], timeout: float) -> dict[str, int]:
    """Poll until every key is remote; returns the count per state at the end."""
    node = Stores(stack.config)
    deadline = time.monotonic() + timeout
    while True:
        states: Counter[str] = Counter()
        for key in keys:
            try:
                record = node.state.get(key)
            except Exception:
                states["redis-down"] += 1
                continue
            states[record.state if record else "missing"] += 1
        if states["remote"] == len(keys) or time.monotonic() > deadline:
            return dict(states)
        time.sleep(0.5)


def oracle(
    stack: Stack, accepted: Accepted, *, timeout: float, prober: Prober | None = None
) -> None:
    keys = accepted.keys()
    assert keys, "no upload was accepted"
    states = wait_all_remote(stack, keys, timeout)
    if states != {"remote": len(keys)}:
        logs = "\n".join(
            f"--- {name}.log\n{stack.services[name].log_tail(300)}"
            for name in ("worker", "resolver", "app")
            if name in stack.services
        )
        raise AssertionError(f"not all remote after {timeout:.0f}s: {states}\n{logs}")
    s3 = boto3.client("s3", endpoint_url=stack.url("s3"), region_name="us-east-1")
    listed: set[str] = set()
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket="qproxy-dev"):
        listed.update(obj["Key"] for obj in page.get("Contents", []))
    assert listed == set(keys), (
        f"extra: {sorted(listed - set(keys))[:5]} missing: {sorted(set(keys) - listed)[:5]}"
    )
    for key in keys:
        body = s3.get_object(Bucket="qproxy-dev", Key=key)["Body"].read()
        sha, size = accepted.files[key]
        assert (hashlib.sha256(body).hexdigest(), len(body)) == (sha, size), f"{key} corrupt in S3"
    open_uploads = s3.list_multipart_uploads(Bucket="qproxy-dev").get("Uploads", [])
    assert open_uploads == [], f"open multipart uploads: {open_uploads}"
    node = Stores(stack.config)
    assert list(node.local.pending_files()) == [], "temp files left behind"
    for path in files_under(node.local.root):
        assert os.path.commonpath([node.local.root, path]) == str(node.local.root)
    if prober is not None:
        server_errors = {s: n for s, n in prober.statuses.items() if s >= 500}
        assert not server_errors, f"resolver answered 5xx: {server_errors}"


def files_under(root: os.PathLike[str] | str) -> Iterator[str]:
    for folder, _, files in os.walk(root):
        for name in files:
            yield os.path.realpath(os.path.join(folder, name))
