"""The worker process: qproxy's Celery app, its tasks, and ``qproxy worker``.

The tasks are thin: each builds nothing, takes this process's :class:`Stores` and calls the
plain function that does the work (:mod:`qproxy.worker.transfer`, :mod:`qproxy.worker.sweep`).
Web nodes never import this module; they send jobs through :mod:`qproxy.stores.queue`.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from collections.abc import Iterator
from importlib.metadata import version
from typing import Any

import redis
from celery import Celery, Task
from celery.exceptions import CPendingDeprecationWarning, Reject, Retry

from qproxy import logs, metrics
from qproxy.compose import Stores
from qproxy.config import Config
from qproxy.errors import QProxyError, StateUnavailable, TransferRetry
from qproxy.stores.queue import DELETE, QUEUE, SWEEP, TRANSFER, celery_app
from qproxy.worker.sweep import sweep
from qproxy.worker.transfer import backoff, purge, transfer

log = logging.getLogger("qproxy.tasks")


def harden_kombu() -> bool:
    """Keep a Celery worker alive through a Redis restart (kombu 5.x only).

    kombu's Redis transport (5.x) raises ``AttributeError: 'NoneType' object has no
    attribute 'hostname'`` when it acks, rejects or restores messages on a connection that
    already went away; raised inside Celery's reconnect path, it leaves the consumer wedged
    for good (seen in the fault suite, Redis SIGKILLed). Swallowing exactly that (and the
    connection errors beside it) is safe here: the message stays in kombu's unacked set and
    comes back after the visibility timeout, and every qproxy task is idempotent and fenced.

    Returns whether the guard is in place. Other kombu versions are left alone: the patch
    names methods of 5.x's ``QoS``.
    """
    kombu_version = version("kombu")
    if kombu_version.split(".")[0] != "5":
        log.warning(
            "kombu %s: the Redis reconnect guard is for kombu 5.x, not applied", kombu_version
        )
        return False
    from kombu.transport import redis as kombu_redis

    qos: Any = kombu_redis.QoS
    if getattr(qos, "_qproxy_hardened", False):
        return True

    def gone(exc: BaseException) -> bool:
        if isinstance(exc, AttributeError):
            return exc.obj is None  # an attribute of the connection that is gone
        return isinstance(exc, (redis.ConnectionError, redis.TimeoutError, OSError))

    def guard(name: str) -> None:
        original = getattr(qos, name)

        def guarded(self: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                return original(self, *args, **kwargs)
            except (AttributeError, redis.RedisError, OSError) as exc:
                if not gone(exc):
                    raise
                log.warning("broker connection gone during %s (left for redelivery): %s", name, exc)
                return None

        setattr(qos, name, guarded)

    for name in ("ack", "reject", "restore_unacked"):
        guard(name)
    qos._qproxy_hardened = True
    return True


def reuse_kombu_clients() -> bool:
    """One redis-py client per kombu Redis channel, not one per call (kombu 5.x only).

    kombu's Redis channel builds a new ``redis.Redis`` on its connection pool for each
    bookkeeping step outside its consumer's own client: a delivery recorded as unacked, its
    ack, a publish (``Channel.conn_or_acquire``). Building one costs ~150 us of CPU in
    redis-py 8 (it copies its tables of response callbacks into each), two or more a job:
    ~6% of a worker's CPU per small file (py-spy, make bench "transfer 1,000 files"). The
    client kept is built the same way on the same pool, so it uses the same connections
    (redis-py clients are thread-safe; each command takes a connection from the pool); a
    channel given a new pool (after a reconnect) builds a new one.

    Returns whether the patch is in place; other kombu versions are left alone.
    """
    if version("kombu").split(".")[0] != "5":
        return False
    from kombu.transport import redis as kombu_redis

    channel: Any = kombu_redis.Channel
    if getattr(channel, "_qproxy_reuses_clients", False):
        return True

    @contextlib.contextmanager
    def conn_or_acquire(self: Any, client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        pool = self.pool
        kept = self.__dict__.get("_qproxy_client")
        if kept is None or kept.connection_pool is not pool:
            kept = self._qproxy_client = self._create_client()
        yield kept

    channel.conn_or_acquire = conn_or_acquire
    channel._qproxy_reuses_clients = True
    return True


def prepare_kombu() -> None:
    """What a worker process changes in kombu before Celery starts (web nodes, which run
    inside the user's app, change nothing): the reconnect guard and one client a channel."""
    harden_kombu()
    reuse_kombu_clients()


# Celery's own line for each job taken and each done ("Task ... received", "... succeeded
# in"): qproxy's transfer line says more (key, size, attempt, state), once a file, and the
# two cost ~3% of a small file's worker CPU (make bench). Warnings and errors still show.
QUIET_CELERY_LOGGERS = ("celery.worker.strategy", "celery.app.trace")


def quiet_cancel_warning(**_: object) -> None:
    """Celery warns at every broker loss that its default for cancelling running jobs
    will change, whatever the setting says; qproxy set it (make_celery). Installed once
    Celery has set up its logging, which puts its deprecation warnings back to "always"."""
    warnings.filterwarnings(
        "ignore",
        message=r"\s*In Celery 5\.1 we introduced an optional breaking change which\s+on "
        "connection loss cancels",
        category=CPendingDeprecationWarning,
    )


def make_celery(config: Config) -> Celery:
    """The Celery app with qproxy's tasks (the worker's side of the queue)."""
    app = celery_app(config)
    # No rate limits on qproxy's tasks: Celery then skips its token buckets for every job.
    app.conf.worker_disable_rate_limits = True
    # Said outright, so Celery 6's default (True) changes nothing: a job running when the
    # broker goes away runs on. Its lease and generation fence the copy Redis hands out
    # again; cancelling it would throw away an upload in flight. (Celery still warns of
    # the coming default at every broker loss: see quiet_cancel_warning.)
    app.conf.worker_cancel_long_running_tasks_on_connection_loss = False
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


_stores: Stores | None = None


def worker_stores() -> Stores:
    """This worker process's stores (built from the environment on first use)."""
    global _stores
    if _stores is None:
        _stores = Stores(Config.from_env())
    return _stores


def _transfer_task(task: Task[Any, Any], key: str, gen: int = 0) -> str:
    stores = worker_stores()
    retries = int(task.request.retries or 0)
    try:
        return transfer(stores, key, attempts_left=stores.config.transfer_retries - retries)
    except TransferRetry:
        return _retry_later(task, stores, retries)
    except StateUnavailable:
        # Redis (the broker too, usually) is down: asking Celery to retry would publish to
        # it, and kombu can wedge the consumer when that fails. The record is untouched
        # (queued), so the sweep queues it again once Redis is back.
        log.warning("transfer %s: Redis unavailable, left for the sweep", key)
        return "redis-down"


def _retry_later(task: Task[Any, Any], stores: Stores, retries: int) -> str:
    try:
        raise task.retry(countdown=backoff(stores.config, retries), max_retries=None)
    except Retry:
        raise  # queued: Celery acknowledges this run
    except (Reject, Exception) as exc:
        # Publishing the retry failed (Celery turns that into a Reject, and kombu rejecting
        # on a dead connection can wedge the consumer): the sweep takes over instead.
        log.warning("retry could not be queued (%s); left for the sweep", exc)
        return "retry-later"


def _delete_task(task: Task[Any, Any], key: str, gen: int = 0) -> str:
    stores = worker_stores()
    try:
        return purge(stores, key)
    except StateUnavailable:
        log.warning("delete %s: Redis unavailable, left for the sweep", key)
        return "redis-down"
    except QProxyError:
        return _retry_later(task, stores, int(task.request.retries or 0))


def _sweep_task() -> dict[str, int]:
    stores = worker_stores()
    if not stores.state.try_lock("sweep", stores.config.sweep_interval):
        return {}
    return sweep(stores, local=False).as_dict()


def default_pool(argv: list[str]) -> list[str]:
    """Celery's thread pool unless the command line names a pool. A transfer waits on the
    disk, the origin and S3, and hashes outside the GIL; prefork's processes cost a pickle
    and a pipe round trip per job on top (measured, 1 MiB files end to end: 4.3 ms of
    worker CPU per file under prefork, 3.3 ms in threads; make bench, "worker CPU")."""
    named = any(a in ("-P", "--pool") or a.startswith(("--pool=", "-P")) for a in argv)
    return [] if named else ["--pool", "threads"]


def run_worker(config: Config, argv: list[str], *, metrics_port: int = 0) -> None:
    """``qproxy worker``: a Celery worker on qproxy's queue (and, with ``metrics_port``,
    its pool's metrics, summed, on that port)."""
    global _stores
    metrics.setup(config)  # before the pool forks: every child counts in the same folder
    if metrics_port:
        from prometheus_client import start_http_server

        start_http_server(metrics_port, registry=metrics.registry())
    _stores = Stores(config)
    prepare_kombu()
    app = make_celery(config)
    from celery.signals import celeryd_after_setup, setup_logging

    celeryd_after_setup.connect(quiet_cancel_warning, weak=False)

    @setup_logging.connect(weak=False)
    def _logging(**_: object) -> None:
        # Celery then leaves logging alone: its own lines come out as qproxy's do (the
        # format QPROXY_LOG_FORMAT says, time and level on each), in every pool process.
        logs.setup(config)
        for name in QUIET_CELERY_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)

    args = ["worker", "--queues", QUEUE, "--loglevel", "INFO", *default_pool(argv), *argv]
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
    # ``celery -A qproxy.worker.app worker`` looks for ``app``; build it from the environment.
    if name in ("app", "celery"):
        prepare_kombu()
        return make_celery(Config.from_env())
    raise AttributeError(name)
