"""A committed file's life on a node: commit it, queue its transfer, delete it.

Order matters in :func:`commit`: the file is renamed into place and journalled (fsynced)
before Redis hears of it, so a Redis outage or crash never loses an accepted file.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from collections.abc import Callable, Iterable
from typing import IO, Any

import httpx

from qproxy.compose import Stores
from qproxy.core.record import FileRecord
from qproxy.errors import KeyExists, LeaseLost, OriginUnreachable, QProxyError, RemoteError
from qproxy.headers import signed_query
from qproxy.stores.local import TempFile

log = logging.getLogger("qproxy")

# Pulling a file from its origin node: a short connect, and a read timeout that measures
# progress (the longest wait for the next bytes), not the whole transfer.
PULL_TIMEOUT = httpx.Timeout(10.0, connect=2.0)


def reserve(stores: Stores, key: str) -> int:
    """Claim ``key`` before its bytes are written (a ``pending`` record): of two writers of
    one name, across processes and nodes, exactly one gets it. Returns the record's
    generation, for :func:`commit`'s ``reserved``; raises :class:`KeyExists` for the other.
    """
    return stores.state.create(key, "pending", {"node": stores.config.node_id})


def reserve_free(stores: Stores, key: str, alternative: Callable[[str], str]) -> tuple[str, int]:
    """:func:`reserve` ``key``, or the first free name ``alternative(key)`` gives when it is
    taken (a writer racing for the same name gets another). Returns the name and the
    reservation's generation."""
    name = key
    for _ in range(100):
        try:
            return name, reserve(stores, name)
        except KeyExists:
            name = alternative(key)
    raise KeyExists(f"no free name like {key!r}")


def release(stores: Stores, key: str, gen: int) -> bool:
    """Give up a reservation whose bytes never came (the save failed, or died): the name is
    free again. False if the record moved on meanwhile (it was committed after all)."""
    try:
        stores.state.transition(key, "deleted", gen=gen, from_states=("pending",))
    except LeaseLost:
        return False
    return stores.state.forget(key)


def commit(
    stores: Stores,
    temp: TempFile,
    key: str,
    fields: dict[str, Any],
    *,
    enqueue: bool = True,
    replace: bool = False,
    reserved: int | None = None,
) -> None:
    """Make an accepted file durable, record it and queue its transfer.

    With ``enqueue=False`` the record stays ``local`` until :func:`enqueue` is called.
    ``reserved`` is the generation :func:`reserve` returned: the record is then taken from
    ``pending`` to ``local`` (the key is already this writer's) instead of created.
    """
    config = stores.config
    try:
        local_id = stores.local.commit(temp, key)
    except BaseException:
        temp.discard()  # (a planted link, a full disk: nothing is left behind)
        raise
    record = {
        "node": config.node_id,
        "node_url": config.node_url,
        "size": temp.size,
        "sha256": temp.sha256,
        "has_local": True,
        "local_id": local_id,
        **fields,
    }
    if not enqueue:
        record["hold"] = True  # the sweep leaves it alone until enqueue() is called
    stores.local.journal.append({"op": "commit", "key": key, "ts": time.time(), **record})
    try:
        if reserved is None:
            gen = stores.state.create(key, "local", record, replace=replace)
        else:
            gen = stores.state.transition(
                key, "local", gen=reserved, from_states=("pending",), fields=record
            )
        if enqueue:
            queue_transfer(stores, key, gen)
    except (QProxyError, OSError) as exc:
        # The file is on disk and in the journal; sweep/reconcile finish the job.
        log.warning("qproxy: %s stored locally but not queued yet: %s", key, exc)


def store(
    stores: Stores,
    chunks: Iterable[bytes],
    key: str,
    fields: dict[str, Any],
    *,
    enqueue: bool = True,
    replace: bool = False,
    reserved: int | None = None,
) -> None:
    """Write ``chunks`` to a temp file and :func:`commit` it under ``key`` (the Django storage's
    ``save()``, ``qproxy put``). Nothing is left behind if the chunks fail: no temp file, and
    the name ``reserved`` is free again."""
    try:
        stores.local.ensure()
        temp = stores.local.create_temp()
    except BaseException:
        if reserved is not None:
            release(stores, key, reserved)
        raise
    try:
        for chunk in chunks:
            temp.write(chunk)
        temp.close()
    except BaseException:
        temp.discard()
        if reserved is not None:
            with contextlib.suppress(QProxyError):
                release(stores, key, reserved)
        raise
    commit(stores, temp, key, fields, enqueue=enqueue, replace=replace, reserved=reserved)


def queue_transfer(stores: Stores, key: str, gen: int) -> None:
    """Send the transfer job and move the record from ``local`` to ``queued``."""
    stores.queue.enqueue_transfer(key, gen)
    with contextlib.suppress(LeaseLost):  # a worker already picked it up
        stores.state.transition(key, "queued", gen=gen, from_states=("local",), fields={"hold": ""})


def enqueue(stores: Stores, key: str) -> bool:
    """Queue the transfer of a committed file (again). False if there is nothing to do."""
    record = stores.state.get(key)
    if record is None or record.state in ("remote", "deleted", "pending"):
        return False
    queue_transfer(stores, key, record.gen)
    return True


def restore(stores: Stores, key: str, entry: dict[str, Any], *, replace: bool = False) -> bool:
    """Create the record of a file that is on this node's disk and queue its transfer
    (a journal entry, or what reconcile found on disk). False if it has a record (with
    ``replace``: the record is replaced, a newer version whose record was lost)."""
    fields: dict[str, Any] = {
        name: entry[name]
        for name in (
            "node",
            "node_url",
            "size",
            "sha256",
            "filename",
            "content_type",
            "meta",
            "private",
            "keep",
            "local_id",
        )
        if name in entry
    }
    fields["has_local"] = True
    if entry.get("hold"):
        fields["hold"] = True
    try:
        gen = stores.state.create(key, "local", fields, replace=replace)
    except KeyExists:
        return False  # someone recorded it meanwhile
    if fields.get("hold"):
        return True
    with contextlib.suppress(QProxyError):  # queued by the next sweep instead
        queue_transfer(stores, key, gen)
    log.info("restored %s from the journal", key)
    return True


def delete(stores: Stores, key: str) -> bool:
    """Mark ``key`` deleted at once (the resolver answers 404 from now on) and remove its
    copies in the background: S3's by a worker, the local one by its node's janitor."""
    journalled = False
    for _ in range(10):
        record = stores.state.get(key)
        if record is None:
            return stores.local.remove(key) if stores.local.exists(key) else False
        if record.state == "deleted":
            return False
        now = time.time()
        if not journalled:  # before Redis, as every change of this node's files
            stores.local.journal.append({"op": "delete", "key": key, "ts": now})
            journalled = True
        try:
            gen = stores.state.transition(
                key,
                "deleted",
                gen=record.gen,
                fields={"lease": "", "lease_until": ""},
                drop=(record.node, now) if record.has_local else None,
            )
        except LeaseLost:
            # A worker moved the record meanwhile (queued -> transferring, say): the delete
            # still wins, on the record as it is now. (The transfer's own compare-and-set
            # then fails, and it removes the object it wrote.)
            continue
        stores.queue.enqueue_delete(key, gen)
        return True
    raise LeaseLost(f"{key}: the record kept changing; not deleted")


def open_copy(stores: Stores, record: FileRecord) -> IO[bytes]:
    """The bytes of a file not yet in S3: this host's copy, or one pulled from its origin
    node over signed HTTP into a temporary file (FileNotFoundError when there is none)."""
    if stores.local.exists(record.key):
        return stores.local.open(record.key)
    if record.node == stores.config.node_id or not record.node_url:
        raise FileNotFoundError(f"local copy of {record.key} is missing on {record.node}")
    query = signed_query(stores.config.secret, record.key, version=record.version)
    url = f"{record.node_url.rstrip('/')}/internal/blob/{record.key}?{query}"
    spool = tempfile.TemporaryFile(prefix="qproxy-pull-")  # noqa: SIM115 (returned open)
    try:
        with httpx.stream("GET", url, timeout=PULL_TIMEOUT) as response:
            status = response.status_code
            if status == 404:  # (the origin's record moved on, or its disk lost the file)
                raise FileNotFoundError(f"origin {record.node} has no {record.key}")
            if status >= 500:
                raise OriginUnreachable(f"origin {record.node} answered {status}")
            if status != 200:
                raise RemoteError(f"origin {record.node} answered {status} for {record.key}")
            for chunk in response.iter_bytes(1024 * 1024):
                spool.write(chunk)
        spool.seek(0)
    except httpx.TransportError as exc:
        spool.close()
        raise OriginUnreachable(
            f"origin {record.node} at {record.node_url} unreachable: {type(exc).__name__} {exc}"
        ) from exc
    except BaseException:
        spool.close()
        raise
    return spool
