"""Prometheus metrics of every qproxy process, with prometheus_client.

A node runs several processes (the app server's workers, the resolver's, a Celery pool),
and a scrape reaches one of them. So each process that calls :func:`setup` writes its
counts into files in one folder per node (prometheus_client's multiprocess mode), and
:func:`exposition` adds them all up: a counter never goes backwards between scrapes,
whichever process answers. The folder is ``QPROXY_METRICS_DIR`` (default: a folder in the
temporary directory named after the local root, so every process of a node finds it).

The resolver serves the sum at ``/metrics``, with the cluster's records by state read from
Redis at scrape time; ``qproxy worker --metrics-port`` serves a worker host's.
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import os
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from qproxy.config import Config

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

ENV = "PROMETHEUS_MULTIPROC_DIR"
_lock = threading.Lock()
_made: _Metrics | None = None

# Seconds: uploads and transfers run from milliseconds to many minutes.
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 1800, 3600)
SIZE_BUCKETS = tuple(float(2**n) for n in range(10, 41, 3))  # 1 KiB .. 1 TiB
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


def default_folder(config: Config) -> str:
    digest = hashlib.sha256(os.path.abspath(config.local_root).encode()).hexdigest()[:12]
    return os.path.join(tempfile.gettempdir(), f"qproxy-metrics-{os.getuid()}-{digest}")


def setup(config: Config) -> None:
    """Count this process's metrics in the node's folder (before prometheus_client is
    imported; a process that imported it already counts on its own)."""
    if "prometheus_client" not in sys.modules:
        # PROMETHEUS_MULTIPROC_DIR, when set, is prometheus_client's own setting: it wins.
        folder = os.environ.get(ENV) or config.metrics_dir or default_folder(config)
        try:
            os.makedirs(folder, mode=0o700, exist_ok=True)
        except OSError:
            os.environ.pop(ENV, None)  # counted in this process only
        else:
            os.environ[ENV] = folder
    _metrics()


class _Metrics:
    """Every metric qproxy exports (the Grafana dashboard in deploy/ uses these names)."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Histogram

        self.uploads = Counter(
            "qproxy_uploads",
            "Files uploaded through the middleware, by outcome (kept: committed; discarded: "
            "the app refused the request or it broke off).",
            ["outcome"],
        )
        self.upload_bytes = Counter(
            "qproxy_upload_bytes", "Bytes of uploaded files, by outcome.", ["outcome"]
        )
        self.upload_seconds = Histogram(
            "qproxy_upload_duration_seconds",
            "From a request's first file byte to its commit or discard.",
            buckets=DURATION_BUCKETS,
        )
        self.transfers = Counter(
            "qproxy_transfers",
            "Transfer attempts to S3, by outcome (remote, retry, failed, conflict).",
            ["outcome"],
        )
        self.transfer_seconds = Histogram(
            "qproxy_transfer_duration_seconds",
            "How long one transfer attempt took.",
            buckets=DURATION_BUCKETS,
        )
        self.transfer_bytes = Histogram(
            "qproxy_transfer_size_bytes", "Size of the files transferred.", buckets=SIZE_BUCKETS
        )
        self.s3_sent = Counter(
            "qproxy_s3_sent_bytes", "Bytes of files sent to S3 (transfers that reached remote)."
        )
        self.retries = Counter(
            "qproxy_transfer_retries", "Transfer attempts that failed and will be retried."
        )
        self.decisions = Counter(
            "qproxy_resolve",
            "The resolver's answers, by decision (local, peer, redirect, missing, forbidden).",
            ["decision"],
        )
        self.decision_seconds = Histogram(
            "qproxy_resolve_duration_seconds",
            "How long the resolver took to decide where a file is.",
            buckets=LATENCY_BUCKETS,
        )
        self.drops = Counter(
            "qproxy_janitor_drops", "Local copies the janitor removed (the file is in S3)."
        )
        self.requeues = Counter(
            "qproxy_sweep_requeued", "Files the sweep queued again (stuck, lost or failed)."
        )
        self.redis_errors = Counter(
            "qproxy_redis_errors", "Redis calls that failed (unreachable, timed out)."
        )
        self.s3_errors = Counter("qproxy_s3_errors", "S3 calls that failed, by operation.", ["op"])
        # Every label value known in advance is shown from the start, at 0 (a rate needs the
        # series before its first event; a dashboard needs the name).
        for outcome in ("kept", "discarded"):
            self.uploads.labels(outcome)
            self.upload_bytes.labels(outcome)
        for outcome in ("remote", "retry", "failed", "conflict"):
            self.transfers.labels(outcome)
        # (The resolver counts every request: its children are looked up once.)
        self.decision_kinds = {
            kind: self.decisions.labels(kind)
            for kind in ("local", "peer", "redirect", "missing", "forbidden")
        }
        for op in ("put", "get", "head", "delete", "listing"):
            self.s3_errors.labels(op)


def _metrics() -> _Metrics:
    global _made
    if _made is None:
        with _lock:
            if _made is None:
                _made = _Metrics()
    return _made


# -- what the rest of qproxy calls (cheap: a lock-free increment in a mapped file) ---------


def upload(outcome: str, size: int, seconds: float) -> None:
    m = _metrics()
    m.uploads.labels(outcome).inc()
    m.upload_bytes.labels(outcome).inc(size)
    m.upload_seconds.observe(seconds)  # (a request's files: one observation each)


def transferred(outcome: str, *, size: int, seconds: float) -> None:
    m = _metrics()
    m.transfers.labels(outcome).inc()
    m.transfer_seconds.observe(seconds)
    if outcome == "remote":
        m.transfer_bytes.observe(size)
        m.s3_sent.inc(size)
    elif outcome == "retry":
        m.retries.inc()


class _Tally:
    """The resolver's per-request counts, added up in this process and written to the
    node's metric files once per turn of the event loop (after every request of that turn):
    each write to them takes a lock and a mapped file, measured at ~18% of a remembered
    lookup's time, and a busy turn answers tens of requests."""

    def __init__(self) -> None:
        self.kinds: dict[str, int] = {}
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)  # the last: +Inf
        self.sum = 0.0
        self.due = False  # a flush is scheduled


_tally = _Tally()


def decided(kind: str, seconds: float) -> None:
    """One answer of the resolver, and how long it took to decide."""
    tally = _tally
    tally.kinds[kind] = tally.kinds.get(kind, 0) + 1
    tally.sum += seconds
    tally.buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
    if not tally.due:
        tally.due = True
        try:
            asyncio.get_running_loop().call_soon(flush)
        except RuntimeError:  # not in an event loop: at once
            flush()


def flush() -> None:
    """Write what this process has added up (:func:`decided`) to the shared metrics."""
    global _tally
    tally, _tally = _tally, _Tally()
    if not tally.kinds:
        return
    m = _metrics()
    for kind, count in tally.kinds.items():
        counter = m.decision_kinds.get(kind)
        (m.decisions.labels(kind) if counter is None else counter).inc(count)
    histogram = m.decision_seconds
    # prometheus_client has no "observe N times": its bucket values, each incremented once.
    histogram._sum.inc(tally.sum)
    for value, count in zip(histogram._buckets, tally.buckets, strict=True):
        if count:
            value.inc(count)


def dropped(count: int = 1) -> None:
    if count:
        _metrics().drops.inc(count)


def requeued(count: int) -> None:
    if count:
        _metrics().requeues.inc(count)


def redis_error() -> None:
    _metrics().redis_errors.inc()


def s3_error(op: str) -> None:
    _metrics().s3_errors.labels(op).inc()


# -- exposition ---------------------------------------------------------------------------

Gauges = Callable[[], Iterable[tuple[str, str, dict[str, str], float]]]


def registry() -> CollectorRegistry:
    """Every process's counts of this node (or this process's, outside multiprocess mode)."""
    from prometheus_client import REGISTRY, CollectorRegistry, multiprocess

    _metrics()
    if ENV not in os.environ:
        return REGISTRY
    out = CollectorRegistry()
    multiprocess.MultiProcessCollector(out)  # type: ignore[no-untyped-call]
    return out


def total(sample: str) -> float:
    """The sum over this node's processes of one sample (e.g. ``qproxy_s3_sent_bytes_total``),
    all labels together."""
    found = 0.0
    for family in registry().collect():
        for item in family.samples:
            if item.name == sample:
                found += item.value
    return found


class _GaugeCollector:
    def __init__(self, gauges: Gauges) -> None:
        self.gauges = gauges

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        families: dict[str, GaugeMetricFamily] = {}
        for name, help_text, labels, value in self.gauges():
            family = families.get(name)
            if family is None:
                family = families[name] = GaugeMetricFamily(name, help_text, labels=list(labels))
            family.add_metric(list(labels.values()), value)
        yield from families.values()


def exposition(gauges: Gauges | None = None) -> tuple[bytes, str]:
    """The text a scrape gets, and its content type: the counts, and ``gauges``
    ((name, help, labels, value), read at scrape time)."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

    text = generate_latest(registry())
    if gauges is not None:
        extra = CollectorRegistry(auto_describe=False)
        extra.register(_GaugeCollector(gauges))
        text += generate_latest(extra)
    return text, CONTENT_TYPE_LATEST
