"""The Celery side: the app, the ``transfer`` task, and the queue the web nodes push to.

Celery on a Redis broker redelivers a task whose worker has not acknowledged it after the
visibility timeout, so a long transfer can run twice at once. Every run is therefore fenced:
it takes a lease on the record, and each state change is a compare-and-set on the
generation and that lease (see :mod:`qproxy.state`).
"""

from __future__ import annotations

import contextlib
import logging
import random
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

from celery import Celery, Task
from celery.exceptions import Reject, Retry

from qproxy.config import Config
from qproxy.errors import LeaseLost, QProxyError, StateUnavailable
from qproxy.headers import content_disposition, signed_query
from qproxy.node import Node
from qproxy.state import FileRecord

log = logging.getLogger("qproxy.tasks")

TRANSFER = "qproxy.transfer"
DELETE = "qproxy.delete"
SWEEP = "qproxy.sweep"
QUEUE = "qproxy"


def _harden_kombu() -> None:
    """Keep a Celery worker alive through a Redis restart.

    kombu's Redis transport (5.x) raises ``AttributeError: 'NoneType' object has no
    attribute 'hostname'`` when it acks, rejects or restores messages on a connection that
    already went away; raised inside Celery's reconnect path, it leaves the consumer wedged
    for good (seen in the fault suite, Redis SIGKILLed). Swallowing it is safe here: the
    message stays in kombu's unacked set and comes back after the visibility timeout, and
    every qproxy task is idempotent and fenced.
    """
    import redis as redis_lib
    from kombu.transport import redis as kombu_redis

    qos: Any = kombu_redis.QoS
    if getattr(qos, "_qproxy_hardened", False):
        return

    def guard(name: str) -> None:
        original = getattr(qos, name)

        def guarded(self: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                return original(self, *args, **kwargs)
            except (AttributeError, redis_lib.RedisError, OSError) as exc:
                log.warning("broker connection gone during %s (left for redelivery): %s", name, exc)
                return None

        setattr(qos, name, guarded)

    for name in ("ack", "reject", "restore_unacked"):
        guard(name)
    qos._qproxy_hardened = True


def make_celery(config: Config) -> Celery:
    _harden_kombu()
    app = Celery("qproxy", broker=config.broker, set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=QUEUE,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "visibility_timeout": config.visibility_timeout,
            # kombu looks for jobs past their visibility timeout only every ~100 s by
            # default; look at a third of the timeout (at most every 10 s).
            "unacked_restore_interval": max(1, min(10, config.visibility_timeout // 3)),
            "unacked_restore_throttle": 1,
            # Without a socket timeout a publish to a vanished broker waits forever.
            "socket_timeout": 10,
            "socket_connect_timeout": 3,
        },
        # A web request must not hang on a dead broker: the commit path falls back to the
        # journal and sweep.
        task_publish_retry_policy={
            "max_retries": 2,
            "interval_start": 0,
            "interval_step": 0.2,
            "interval_max": 0.5,
        },
        broker_connection_timeout=3,
        worker_hijack_root_logger=False,
    )
    app.task(name=TRANSFER, bind=True, acks_late=True, max_retries=None)(_transfer_task)
    app.task(name=DELETE, bind=True, acks_late=True, max_retries=None)(_delete_task)
    app.task(name=SWEEP)(_sweep_task)
    # `qproxy worker -B` (Celery's embedded beat) sweeps the cluster periodically.
    app.conf.beat_schedule = {
        "qproxy-sweep": {
            "task": SWEEP,
            "schedule": config.sweep_interval,
            "options": {"queue": QUEUE},
        }
    }
    return app


class CeleryQueue:
    """:class:`qproxy.node.TransferQueue` over Celery."""

    def __init__(self, config: Config) -> None:
        self.app = make_celery(config)

    def enqueue_transfer(self, key: str, gen: int) -> None:
        self.app.send_task(TRANSFER, args=[key, gen], queue=QUEUE)

    def enqueue_delete(self, key: str, gen: int) -> None:
        self.app.send_task(DELETE, args=[key, gen], queue=QUEUE)


_node: Node | None = None


def worker_node() -> Node:
    """This worker process's node (built from the environment on first use)."""
    global _node
    if _node is None:
        _node = Node(Config.from_env())
    return _node


def backoff(config: Config, retries: int) -> float:
    """Exponential backoff with full jitter, capped below the visibility timeout."""
    ceiling = min(config.retry_backoff_max, config.retry_backoff * (2**retries))
    return random.uniform(ceiling / 2, ceiling)


def _transfer_task(task: Task[Any, Any], key: str, gen: int = 0) -> str:
    node = worker_node()
    retries = int(task.request.retries or 0)
    try:
        return transfer(node, key, attempts_left=node.config.transfer_retries - retries)
    except TransferRetry:
        return _retry_later(task, node, retries)
    except StateUnavailable:
        # Redis (the broker too, usually) is down: asking Celery to retry would publish to
        # it, and kombu can wedge the consumer when that fails. The record is untouched
        # (queued), so the sweep queues it again once Redis is back.
        log.warning("transfer %s: Redis unavailable, left for the sweep", key)
        return "redis-down"


def _retry_later(task: Task[Any, Any], node: Node, retries: int) -> str:
    try:
        raise task.retry(countdown=backoff(node.config, retries), max_retries=None)
    except Retry:
        raise  # queued: Celery acknowledges this run
    except (Reject, Exception) as exc:
        # Publishing the retry failed (Celery turns that into a Reject, and kombu rejecting
        # on a dead connection can wedge the consumer): the sweep takes over instead.
        log.warning("retry could not be queued (%s); left for the sweep", exc)
        return "retry-later"


class TransferRetry(Exception):
    """This attempt failed (``cause``); the record is back in ``queued`` for another."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(str(cause))
        self.cause = cause


def transfer(node: Node, key: str, *, attempts_left: int = 1) -> str:
    """Move ``key`` to S3 and mark it remote. Returns the state the record ends in.

    Idempotent: a record already remote (or deleted, or owned by a live lease) is left alone.
    Raises :class:`TransferRetry` when this attempt failed and another should follow.
    """
    state = node.state
    record = state.get(key)
    now = time.time()
    if record is None:
        log.warning("transfer %s: no record, nothing to do", key)
        return "missing"
    if record.state == "transferring" and record.lease_until > now:
        log.info("transfer %s: another run holds the lease, skipping", key)
        return "transferring"
    if record.state not in ("local", "queued", "failed", "transferring"):
        return record.state

    token = uuid.uuid4().hex
    try:
        gen = state.transition(
            key,
            "transferring",
            gen=record.gen,
            fields={
                "lease": token,
                "lease_until": now + node.config.lease_seconds,
                "attempts": record.attempts + 1,
            },
        )
    except LeaseLost:
        # The record moved between our read and the lease (a sweep queued it again, a
        # duplicate run took it): start over from what it is now.
        if attempts_left <= -3:
            return "conflict"
        return transfer(node, key, attempts_left=attempts_left - 1)
    try:
        with _source(node, record) as fh:
            node.remote.store(
                record.object,
                fh,
                size=record.size,
                sha256=record.sha256,
                content_type=record.content_type,
                content_disposition=content_disposition(record.filename),
            )
    except LeaseLost:
        raise
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"[:500]
        final = attempts_left <= 1 or isinstance(exc, FileNotFoundError)
        try:
            state.transition(
                key,
                "failed" if final else "queued",
                gen=gen,
                lease=token,
                fields={"lease": "", "lease_until": "", "error": error},
            )
        except LeaseLost as lost:
            log.warning("transfer %s: lease conflict after failure: %s", key, lost)
            return "conflict"
        if final:
            log.error("transfer %s failed for good: %s", key, error)
            run_hook(node, node.config.on_failed, state.get(key))
            return "failed"
        log.warning("transfer %s failed, will retry: %s", key, error)
        raise TransferRetry(exc) from exc

    keep = max(node.config.keep_local_seconds, node.config.drop_grace_seconds)
    try:
        state.transition(
            key,
            "remote",
            gen=gen,
            lease=token,
            fields={
                "lease": "",
                "lease_until": "",
                "error": "",
                "remote_at": time.time(),
                "has_remote": True,
                # Served from S3 from now on: no node serves it to peers any more.
                "node_url": "",
            },
            drop=(record.node, time.time() + keep),
        )
    except LeaseLost as lost:
        log.warning("transfer %s: lease conflict, not marking remote: %s", key, lost)
        now_record = state.get(key)
        if (
            now_record is None
            or now_record.state == "deleted"
            or now_record.version != record.version
        ):
            # Deleted or replaced while we uploaded: the object we wrote (this version's own
            # name) must not outlive it. A duplicate run of the same version leaves it be.
            node.remote.delete(record.object)
        return "conflict"
    for name in record.stale:
        # Older versions of the key: safe to remove now that this one is verified in S3.
        with contextlib.suppress(QProxyError):
            node.remote.delete(name)
    if record.stale:
        with contextlib.suppress(LeaseLost):
            remote_record = state.get(key)
            if remote_record is not None and remote_record.state == "remote":
                state.transition(
                    key,
                    "remote",
                    gen=remote_record.gen,
                    from_states=("remote",),
                    fields={"stale": ""},
                )
    log.info("transfer %s: remote (%d bytes, sha256 %s)", key, record.size, record.sha256)
    if node.config.on_transferred:  # (no Redis read for a hook nobody set)
        run_hook(node, node.config.on_transferred, state.get(key))
    return "remote"


def run_hook(node: Node, path: str, record: FileRecord | None) -> None:
    """Call the user's hook (a dotted path) with the whole record; never fail the task."""
    if not path or record is None:
        return
    from importlib import import_module

    module, _, name = path.rpartition(".")
    try:
        hook = getattr(import_module(module), name)
        hook({**record.as_dict(), "url": node.url_for(record.key)})
    except Exception:
        log.exception("hook %s failed for %s", path, record.key)


def _delete_task(task: Task[Any, Any], key: str, gen: int = 0) -> str:
    node = worker_node()
    try:
        return purge(node, key)
    except StateUnavailable:
        log.warning("delete %s: Redis unavailable, left for the sweep", key)
        return "redis-down"
    except QProxyError:
        return _retry_later(task, node, int(task.request.retries or 0))


def _sweep_task() -> dict[str, int]:
    from qproxy.sweep import sweep

    node = worker_node()
    if not node.state.try_lock("sweep", node.config.sweep_interval):
        return {}
    return sweep(node, local=False).as_dict()


def purge(node: Node, key: str) -> str:
    """Remove the S3 copy of a deleted file (and the local one, if it is on this host)."""
    state = node.state
    record = state.get(key)
    if record is None:
        return "gone"
    if record.state != "deleted":
        return record.state  # uploaded again since: nothing to remove
    for name in (record.object, *record.stale):
        node.remote.delete(name)
    fields: dict[str, Any] = {"has_remote": False}
    if record.node == node.config.node_id and node.local.exists(key):
        node.local.remove(key)
        fields["has_local"] = False
    for _ in range(5):
        try:
            state.transition(
                key, "deleted", gen=record.gen, from_states=("deleted",), fields=fields
            )
            break
        except LeaseLost:
            # The origin's janitor may have marked its copy gone meanwhile (a new
            # generation of the same deleted record): read it again and retry.
            again = state.get(key)
            if again is None:
                return "gone"
            if again.state != "deleted" or again.version != record.version:
                return "conflict"
            record = again
    else:
        return "conflict"
    state.forget(key)
    return "deleted"


@contextmanager
def _source(node: Node, record: FileRecord) -> Iterator[IO[bytes]]:
    """The file's bytes: from this host's disk, or pulled from the origin node."""
    if node.local.exists(record.key):
        with node.local.open(record.key) as fh:
            yield fh
        return
    if record.node == node.config.node_id or not record.node_url:
        raise FileNotFoundError(f"local copy of {record.key} is missing on {record.node}")
    import httpx

    url = f"{record.node_url.rstrip('/')}/internal/blob/{record.key}?{signed_query(node.config.secret, record.key)}"
    with tempfile.TemporaryFile(prefix="qproxy-pull-") as spool:
        with httpx.stream("GET", url, timeout=30) as response:
            if response.status_code != 200:
                raise QProxyError(
                    f"origin {record.node} answered {response.status_code} for {record.key}"
                )
            for chunk in response.iter_bytes(1024 * 1024):
                spool.write(chunk)
        spool.seek(0)
        yield spool


def run_worker(config: Config, argv: list[str]) -> None:
    """``qproxy worker``: a Celery worker on qproxy's queue."""
    global _node
    _node = Node(config)
    app = make_celery(config)
    args = ["worker", "--queues", QUEUE, "--loglevel", "INFO", *argv]
    import click

    try:
        app.worker_main(args)
    except click.exceptions.Exit as exc:
        raise SystemExit(exc.exit_code) from None
    except click.ClickException as exc:
        # Celery's own usage errors: one line, like every qproxy error.
        print(f"qproxy worker: {exc.format_message()}", file=sys.stderr)
        raise SystemExit(2) from None


def __getattr__(name: str) -> Any:
    # ``celery -A qproxy.tasks worker`` looks for ``app``; build it from the environment.
    if name in ("app", "celery"):
        return make_celery(Config.from_env())
    raise AttributeError(name)
