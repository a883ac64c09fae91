"""Finishing what crashes left half done, at a cost that follows what is stuck.

``sweep`` has a node part (replay this node's journal into Redis, drop local copies that are
safely in S3, remove temp files of requests that died) and a cluster part (queue again what
sits in ``local``/``queued`` too long or in ``transferring`` past its lease, abort stale S3
multipart uploads). Every resolver runs the node part as its janitor; the cluster part runs
on one node at a time (a Redis lock), or in the worker (``qproxy worker -B``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from qproxy import metrics
from qproxy.compose import Stores
from qproxy.core.record import FileRecord
from qproxy.errors import InvalidKey, LeaseLost, QProxyError
from qproxy.keys import validate_key
from qproxy.lifecycle.files import delete, release, restore
from qproxy.lifecycle.tus import Tus

log = logging.getLogger("qproxy.sweep")

JOURNAL_SETTLE_SECONDS = 5.0  # a commit this recent may still be on its way to Redis
JOURNAL_BATCH = 5000
# After a failover, how much of the journal is replayed again: far more than the replication
# lag a failover can lose (seconds).
REWIND_SECONDS = 600


@dataclass
class SweepReport:
    replayed: int = 0
    dropped: int = 0
    pending_removed: int = 0
    tus_expired: int = 0
    requeued: int = 0
    reservations_released: int = 0
    multipart_aborted: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def sweep(
    stores: Stores,
    *,
    now: float | None = None,
    stuck_after: float | None = None,
    pending_max_age: float | None = None,
    cluster: bool = True,
    local: bool = True,
) -> SweepReport:
    report = SweepReport()
    now = time.time() if now is None else now
    if local:
        report.replayed = replay_journal(stores, now=now)
        report.dropped = drop_local_copies(stores, now=now)
        if stores.config.tus_path:
            report.tus_expired = Tus(stores).remove_expired(now=now)
        report.pending_removed = remove_dead_pending(
            stores,
            max_age=stores.config.pending_max_age if pending_max_age is None else pending_max_age,
            now=now,
        )
    if cluster:
        stuck = stores.config.stuck_seconds if stuck_after is None else stuck_after
        report.requeued = requeue_stuck(stores, older_than=now - stuck, now=now)
        max_age = stores.config.pending_max_age if pending_max_age is None else pending_max_age
        report.reservations_released = release_dead_reservations(stores, older_than=now - max_age)
        report.multipart_aborted = abort_stale_multipart(stores, now=now)
    metrics.dropped(report.dropped)
    metrics.requeued(report.requeued)
    return report


def replay_journal(stores: Stores, *, now: float | None = None) -> int:
    """Give Redis the commits it missed (it was down, or lost them): record and queue them.

    Reads only what was appended since the last replay (an offset kept beside the journal),
    but for one case: when Redis's history changed since the last round (a failover
    promoted a replica, which may lack the last writes the old master acknowledged; a Redis
    restarted without its data), the last REWIND_SECONDS are replayed again, deletes and
    new versions included, so the records converge on what this node accepted.
    """
    journal = stores.local.journal
    offset_path = journal.path.with_suffix(".offset")
    try:
        offset = int(offset_path.read_text() or 0)
    except (FileNotFoundError, ValueError):
        offset = 0
    now = time.time() if now is None else now
    epoch_path = journal.path.with_suffix(".epoch")
    rewind, epoch = _history_changed(stores, epoch_path)
    if rewind:
        offset = min(offset, journal.offset_since(now - REWIND_SECONDS))
        log.warning(
            "Redis's history changed (a failover?): replaying the journal's last %ds",
            REWIND_SECONDS,
        )
    entries: list[tuple[int, dict[str, Any]]] = []
    try:
        with open(journal.path, "rb") as fh:
            fh.seek(offset)
            position = offset
            for line in fh:
                if not line.endswith(b"\n") or len(entries) >= JOURNAL_BATCH:
                    break
                try:
                    entry = json.loads(line)
                except ValueError:
                    position += len(line)
                    continue
                if entry.get("ts", 0) > now - JOURNAL_SETTLE_SECONDS:
                    break
                position += len(line)
                entries.append((position, entry))
    except FileNotFoundError:
        return 0
    # What this node did last to each key decides.
    last: dict[str, dict[str, Any]] = {}
    for _, entry in entries:
        if entry.get("op") in ("commit", "delete") and entry.get("key"):
            last[entry["key"]] = entry
    replayed = 0
    commits = [e for e in last.values() if e["op"] == "commit"]
    if commits:
        present = stores.state.exists_many([e["key"] for e in commits])
        for entry, has_record in zip(commits, present, strict=True):
            key = entry["key"]
            if not stores.local.exists(key):
                continue
            if not has_record:
                replayed += restore(stores, key, entry)
            elif rewind and _lost_version(stores, key, entry):
                replayed += restore(stores, key, entry, replace=True)
    if rewind:
        for entry in last.values():
            if entry["op"] != "delete":
                continue
            record = stores.state.get(entry["key"])
            # A delete the new master never heard of (not a newer upload of the key).
            if record is not None and record.state != "deleted" and record.created <= entry["ts"]:
                replayed += delete(stores, entry["key"])
    if entries:
        offset_path.write_text(str(entries[-1][0]))
    # The history is recorded with the offset (the first time, once the journal has
    # entries), not on a janitor round of its own: no bookkeeping file appears under the
    # root of a node that has accepted nothing.
    if epoch and (entries or rewind):
        epoch_path.write_text(epoch)
    return replayed


def _history_changed(stores: Stores, path: Path) -> tuple[bool, str]:
    """Whether Redis's history changed since it was recorded, and the current one."""
    current = stores.state.epoch()
    try:
        seen = path.read_text()
    except FileNotFoundError:
        seen = ""
    return bool(seen and current and current != seen), current


def _lost_version(stores: Stores, key: str, entry: dict[str, Any]) -> bool:
    """The record is of an older version than this node's last commit of ``key`` (that
    commit's record was lost)."""
    record = stores.state.get(key)
    return (
        record is not None
        and record.state != "deleted"
        and record.created < float(entry.get("ts", 0)) - 1.0
        and bool(entry.get("sha256"))
        and record.sha256 != entry.get("sha256")
    )


def remove_dead_pending(stores: Stores, *, max_age: float, now: float) -> int:
    """Temp files nobody has written to for ``max_age``: their requests died."""
    removed = 0
    for name, mtime in stores.local.pending():
        if mtime < now - max_age:
            with contextlib.suppress(FileNotFoundError):
                stores.local.remove_temp(name)
                removed += 1
    return removed


def requeue_stuck(stores: Stores, *, older_than: float, now: float, limit: int = 1000) -> int:
    state = stores.state
    requeued = 0
    for name in ("local", "queued", "transferring"):
        for key in state.keys_in_state(name, older_than=older_than, limit=limit):
            record = state.get(key)
            if record is None or record.state != name:
                continue
            if name == "transferring" and record.lease_until > now:
                continue  # a live run owns it
            if record.hold:
                continue  # delayed on purpose (QueuedStorage(delayed=True))
            if requeue(stores, record):
                requeued += 1
    # Failed for good is rarely for good (a bucket policy fixed, a disk remounted): once in a
    # while (QPROXY_FAILED_RETRY_SECONDS) each is tried again.
    failed_before = now - stores.config.failed_retry_seconds
    for key in state.keys_in_state("failed", older_than=failed_before, limit=limit):
        record = state.get(key)
        if record is not None and record.state == "failed" and requeue(stores, record):
            requeued += 1
    # Deletes whose job was lost: send it again (purging twice is harmless).
    for key in state.keys_in_state("deleted", older_than=older_than, limit=limit):
        record = state.get(key)
        if record is not None and record.state == "deleted":
            with contextlib.suppress(LeaseLost):
                gen = state.transition(key, "deleted", gen=record.gen, from_states=("deleted",))
                stores.queue.enqueue_delete(key, gen)
                requeued += 1
    return requeued


def release_dead_reservations(stores: Stores, *, older_than: float, limit: int = 1000) -> int:
    """Names reserved (``pending``) before ``older_than`` whose bytes never came: the save
    died (a killed process). Free them again. (A save killed after its file reached the
    disk but before Redis heard of it left a journal entry: ``qproxy reconcile`` on that
    node gives the file its record back.)"""
    state = stores.state
    released = 0
    for key in state.keys_in_state("pending", older_than=older_than, limit=limit):
        record = state.get(key)
        if record is None or record.state != "pending":
            continue
        if release(stores, key, record.gen):
            released += 1
    return released


def requeue(stores: Stores, record: FileRecord) -> bool:
    """Queue the transfer again, touching the record so the next sweep leaves it alone."""
    try:
        gen = stores.state.transition(
            record.key,
            "queued",
            gen=record.gen,
            from_states=("local", "queued", "transferring", "failed"),
            fields={"lease": "", "lease_until": ""},
        )
    except LeaseLost:
        return False
    stores.queue.enqueue_transfer(record.key, gen)
    return True


def retry_failed(stores: Stores, keys: list[str] | None = None) -> list[str]:
    """``qproxy retry``: queue failed transfers again (all of them without ``keys``)."""
    state = stores.state
    targets = keys if keys is not None else state.keys_in_state("failed", limit=100_000)
    done = []
    for key in targets:
        record = state.get(validate_key(key))
        if record is not None and record.state == "failed" and requeue(stores, record):
            done.append(key)
    return done


def abort_stale_multipart(stores: Stores, *, now: float) -> int:
    """Multipart uploads a killed worker left behind (S3 bills their parts): those started
    more than QPROXY_MULTIPART_MAX_AGE ago, but for one a live run is still sending (its
    record ``transferring`` that object, its lease not over). Without that exception a
    file slower to send than the age (a big one on a slow link, or an age set short) had
    every attempt aborted under it, and never reached S3."""
    aborted = 0
    try:
        uploads = stores.remote.partial_uploads()
    except QProxyError as exc:  # S3 down: next time
        log.warning("sweep: cannot list multipart uploads: %s", exc)
        return 0
    for upload in uploads:
        if upload.started >= now - stores.config.multipart_max_age:
            continue
        try:
            if _being_sent(stores, upload.name, now=now):
                continue
        except QProxyError as exc:  # Redis away: it cannot tell, so it aborts nothing
            log.warning("sweep: cannot read the records of multipart uploads: %s", exc)
            return aborted
        with contextlib.suppress(QProxyError):
            stores.remote.abort(upload)
            aborted += 1
    return aborted


def _being_sent(stores: Stores, name: str, *, now: float) -> bool:
    """Whether a live transfer run is uploading the object ``name`` (without the prefix)."""
    # The object of a key's version 1 is the key itself, later ones ``key~vN``
    # (FileRecord.object; "~" is in no key).
    try:
        record = stores.state.get(validate_key(name.partition("~v")[0]))
    except InvalidKey:  # not an object qproxy names
        return False
    return (
        record is not None
        and record.state == "transferring"
        and record.object == name
        and record.lease_until > now
    )


def drop_local_copies(stores: Stores, *, now: float | None = None, limit: int = 500) -> int:
    """The janitor: remove local copies whose S3 copy is verified and whose keep period is over.

    Looks only at this node's drop schedule, so its cost follows what is due, not all files.
    Returns how many files it removed.
    """
    state = stores.state
    removed = 0
    for key in state.due_drops(stores.config.node_id, now=now, limit=limit):
        record = state.get(key)
        if record is None or record.state not in ("remote", "deleted"):
            # Re-uploaded under the same key since: the new local file is the only copy.
            # (No record: already marked by another janitor, or its file saved again and
            # the new record not written yet.)
            state.drop_done(stores.config.node_id, key, None)
            continue
        try:
            # Only the file this record describes: one saved again under the name since,
            # its record not written yet (a Redis blip), is the only copy of that one.
            if stores.local.remove(key, expect=record.local_id):
                removed += 1
        except (OSError, QProxyError) as exc:
            log.warning("qproxy janitor: cannot remove %s: %s", key, exc)
            continue
        state.drop_done(stores.config.node_id, key, record)
    return removed
