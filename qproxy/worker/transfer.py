"""Moving one file to S3, and removing a deleted one: the work behind the Celery tasks.

Celery on a Redis broker redelivers a task whose worker has not acknowledged it after the
visibility timeout, so a long transfer can run twice at once. Every run is therefore fenced:
it takes a lease on the record, and each state change is a compare-and-set on the
generation and that lease (see :mod:`qproxy.stores.state`). These functions know nothing of
Celery: :mod:`qproxy.worker.app` wraps them in tasks.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
import uuid
from typing import Any

from qproxy import metrics
from qproxy.compose import Stores
from qproxy.config import Config
from qproxy.core.decision import shown_as
from qproxy.core.record import FileRecord
from qproxy.errors import LeaseLost, OriginUnreachable, QProxyError, TransferRetry
from qproxy.lifecycle import files

log = logging.getLogger("qproxy.tasks")


def backoff(config: Config, retries: int) -> float:
    """Exponential backoff with full jitter, capped below the visibility timeout."""
    ceiling = min(config.retry_backoff_max, config.retry_backoff * (2**retries))
    return random.uniform(ceiling / 2, ceiling)


def transfer(stores: Stores, key: str, *, attempts_left: int = 1) -> str:
    """Move ``key`` to S3 and mark it remote. Returns the state the record ends in.

    Idempotent: a record already remote (or deleted, or owned by a live lease) is left alone.
    Raises :class:`TransferRetry` when this attempt failed and another should follow.
    """
    started = time.monotonic()
    sizes: list[int] = []
    try:
        outcome = _transfer(stores, key, attempts_left=attempts_left, sizes=sizes)
    except TransferRetry:
        metrics.transferred("retry", size=0, seconds=time.monotonic() - started)
        raise
    if outcome in ("remote", "failed", "conflict") and sizes:
        size = sizes[-1]
        metrics.transferred(outcome, size=size, seconds=time.monotonic() - started)
    return outcome


def _transfer(stores: Stores, key: str, *, attempts_left: int, sizes: list[int]) -> str:
    state = stores.state
    started = time.monotonic()
    token = uuid.uuid4().hex
    now = time.time()
    # The record read and the lease taken in one step: no other run, sweep or re-upload
    # can come between them.
    outcome, record = state.claim(
        key,
        {
            "lease": token,
            "lease_until": now + stores.config.lease_seconds,
            # Sent on its way: no longer held back (delayed=True) from the sweep, which
            # must find it if this run dies (enqueue() clears it too, but its job can
            # reach a worker before that write).
            "hold": "",
        },
        now=now,
    )
    if record is None:
        log.warning("transfer %s: no record, nothing to do", key)
        return "missing"
    if outcome == "leased":
        log.info("transfer %s: another run holds the lease, skipping", key)
        return "transferring"
    if outcome != "claimed":
        return record.state
    gen = record.gen
    sizes.append(record.size)  # (an attempt: counted in the metrics)

    def fields(gen: int) -> dict[str, Any]:
        """What every line of this attempt carries (JSON logs: fields of their own)."""
        return {
            "key": key,
            "node": record.node,
            "gen": gen,
            "attempt": record.attempts,
            "size": record.size,
            "duration_ms": round((time.monotonic() - started) * 1000, 1),
        }

    # Stored the way it is served (public mode sends clients to the object as it is).
    shown = shown_as(record.content_type, record.filename, inline_types=stores.config.inline)
    try:
        with files.open_copy(stores, record) as fh:
            stores.remote.store(
                record.object,
                fh,
                size=record.size,
                sha256=record.sha256,
                content_type=shown.content_type,
                content_disposition=shown.disposition,
            )
    except LeaseLost:
        raise
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"[:500]
        # An origin node that does not answer is no failed transfer: the file is there, and
        # waiting heals it, so it is retried (capped backoff) for as long as it takes. A
        # missing file fails at once; other errors after QPROXY_TRANSFER_RETRIES attempts
        # (and the sweep still retries those, slowly).
        final = not isinstance(exc, OriginUnreachable) and (
            attempts_left <= 1 or isinstance(exc, FileNotFoundError)
        )
        try:
            state.transition(
                key,
                "failed" if final else "queued",
                gen=gen,
                lease=token,
                fields={"lease": "", "lease_until": "", "error": error},
            )
        except LeaseLost as lost:
            log.warning(
                "transfer %s: lease conflict after failure: %s", key, lost, extra=fields(gen)
            )
            return "conflict"
        if final:
            log.error(
                "transfer %s failed for good (attempt %d): %s",
                key,
                record.attempts,
                error,
                extra={**fields(gen), "state": "failed", "error": error},
            )
            run_hook(stores, stores.config.on_failed, state.get(key))
            return "failed"
        log.warning(
            "transfer %s failed (attempt %d), will retry: %s",
            key,
            record.attempts,
            error,
            extra={**fields(gen), "state": "queued", "error": error},
        )
        raise TransferRetry(exc) from exc

    wanted = stores.config.keep_local_seconds if record.keep is None else record.keep
    keep = max(wanted, stores.config.drop_grace_seconds)
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
        log.warning(
            "transfer %s: lease conflict, not marking remote: %s", key, lost, extra=fields(gen)
        )
        now_record = state.get(key)
        if (
            now_record is None
            or now_record.state == "deleted"
            or now_record.version != record.version
        ):
            # Deleted or replaced while we uploaded: the object we wrote (this version's own
            # name) must not outlive it. A duplicate run of the same version leaves it be.
            stores.remote.delete(record.object)
        return "conflict"
    for name in record.stale:
        # Older versions of the key: safe to remove now that this one is verified in S3.
        with contextlib.suppress(QProxyError):
            stores.remote.delete(name)
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
    done = fields(gen)
    log.info(
        "transfer %s: remote (%d bytes, attempt %d, gen %d, from %s, %.0f ms, sha256 %s)",
        key,
        record.size,
        done["attempt"],
        gen,
        record.node,
        done["duration_ms"],
        record.sha256,
        extra={**done, "state": "remote"},
    )
    if stores.config.on_transferred:  # (no Redis read for a hook nobody set)
        run_hook(stores, stores.config.on_transferred, state.get(key))
    return "remote"


def run_hook(stores: Stores, path: str, record: FileRecord | None) -> None:
    """Call the user's hook (a dotted path) with the whole record; never fail the task."""
    if not path or record is None:
        return
    from importlib import import_module

    module, _, name = path.rpartition(".")
    try:
        hook = getattr(import_module(module), name)
        hook({**record.as_dict(), "url": stores.url_for(record.key)})
    except Exception:
        log.exception("hook %s failed for %s", path, record.key)


def purge(stores: Stores, key: str) -> str:
    """Remove the S3 copies of a deleted file. The local copy is the origin's janitor's (a
    drop scheduled at the delete): removing it here, from a record read before S3 answered,
    could remove the file of a new upload of the same name (seen: collectstatic's delete
    then save)."""
    state = stores.state
    record = state.get(key)
    if record is None:
        return "gone"
    if record.state != "deleted":
        return record.state  # uploaded again since: nothing to remove
    for name in (record.object, *record.stale):
        stores.remote.delete(name)
    fields: dict[str, Any] = {"has_remote": False}
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
