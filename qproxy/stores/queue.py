"""The transfer queue web nodes push to: Celery's client side, over the broker.

Only sending lives here (``send_task`` by name needs no task code); the tasks themselves
and the worker process are in ``qproxy/worker/``. Broker errors (kombu's, redis-py's)
become :class:`qproxy.errors.StateUnavailable` here, in one place.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import redis
from celery import Celery
from celery.exceptions import CeleryError
from kombu.exceptions import KombuError

from qproxy.config import Config
from qproxy.errors import StateUnavailable
from qproxy.redis_url import kombu_broker

TRANSFER = "qproxy.transfer"
DELETE = "qproxy.delete"
SWEEP = "qproxy.sweep"
QUEUE = "qproxy"


def celery_app(config: Config) -> Celery:
    """A Celery app configured for qproxy's queue (no tasks registered)."""
    broker, sentinel_options = kombu_broker(config.broker)
    app = Celery("qproxy", broker=broker, set_as_current=False)
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
            **sentinel_options,
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
    return app


@contextlib.contextmanager
def broker_errors() -> Iterator[None]:
    """kombu and its transports raise their own connection errors (and OSError): the broker
    is Redis, so they are a :class:`StateUnavailable`."""
    try:
        yield
    except (KombuError, CeleryError, redis.RedisError, OSError) as exc:
        raise StateUnavailable(f"broker: {type(exc).__name__}: {exc}") from exc


class CeleryQueue:
    """:class:`qproxy.stores.TransferQueue` over Celery."""

    def __init__(self, config: Config) -> None:
        self.app = celery_app(config)

    def enqueue_transfer(self, key: str, gen: int) -> None:
        with broker_errors():
            self.app.send_task(TRANSFER, args=[key, gen], queue=QUEUE)

    def enqueue_delete(self, key: str, gen: int) -> None:
        with broker_errors():
            self.app.send_task(DELETE, args=[key, gen], queue=QUEUE)
