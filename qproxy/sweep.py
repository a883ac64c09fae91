"""Finishing what crashes left half done, at a cost that follows what is stuck.

``sweep`` has a node part (replay this node's journal into Redis, drop local copies that are
safely in S3, remove temp files of requests that died) and a cluster part (queue again what
sits in ``local``/``queued`` too long or in ``transferring`` past its lease, abort stale S3
multipart uploads). ``reconcile`` rebuilds every record after Redis lost them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

from qproxy.errors import LeaseLost, QProxyError, RemoteError
from qproxy.keys import validate_key
from qproxy.node import Node, drop_local_copies
from qproxy.state import FileRecord

log = logging.getLogger("qproxy.sweep")

JOURNAL_SETTLE_SECONDS = 5.0  # a commit this recent may still be on its way to Redis
JOURNAL_BATCH = 5000


@dataclass
class SweepReport:
    replayed: int = 0
    dropped: int = 0
    pending_removed: int = 0
    requeued: int = 0
    multipart_aborted: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def sweep(
    node: Node,
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
        report.replayed = replay_journal(node, now=now)
        report.dropped = drop_local_copies(node, now=now)
        report.pending_removed = remove_dead_pending(
            node,
            max_age=node.config.pending_max_age if pending_max_age is None else pending_max_age,
            now=now,
        )
    if cluster:
        stuck = node.config.stuck_seconds if stuck_after is None else stuck_after
        report.requeued = requeue_stuck(node, older_than=now - stuck, now=now)
        report.multipart_aborted = abort_stale_multipart(node, now=now)
    return report


def replay_journal(node: Node, *, now: float | None = None) -> int:
    """Give Redis the commits it missed (it was down, or lost them): record and queue them.

    Reads only what was appended since the last replay (an offset kept beside the journal).
    """
    journal = node.local.journal
    offset_path = journal.path.with_suffix(".offset")
    try:
        offset = int(offset_path.read_text() or 0)
    except (FileNotFoundError, ValueError):
        offset = 0
    now = time.time() if now is None else now
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
    commits = [e for _, e in entries if e.get("op") == "commit" and e.get("key")]
    deleted = {e["key"] for _, e in entries if e.get("op") == "delete"}
    replayed = 0
    if commits:
        present = node.state.exists_many([e["key"] for e in commits])
        for entry, has_record in zip(commits, present, strict=True):
            key = entry["key"]
            if has_record or key in deleted or not node.local.exists(key):
                continue
            if restore_local(node, key, entry):
                replayed += 1
    if entries:
        offset_path.write_text(str(entries[-1][0]))
    return replayed


def restore_local(node: Node, key: str, entry: dict[str, Any]) -> bool:
    """Create the record of a file that is on this node's disk and queue its transfer."""
    fields: dict[str, Any] = {
        name: entry[name]
        for name in ("node", "node_url", "size", "sha256", "filename", "content_type", "meta")
        if name in entry
    }
    fields["has_local"] = True
    if entry.get("hold"):
        fields["hold"] = True
    try:
        gen = node.state.create(key, "local", fields)
    except LeaseLost:
        return False  # someone recorded it meanwhile
    if fields.get("hold"):
        return True
    with contextlib.suppress(Exception):
        node.queue_transfer(key, gen)
    log.info("restored %s from the journal", key)
    return True


def remove_dead_pending(node: Node, *, max_age: float, now: float) -> int:
    """Temp files nobody has written to for ``max_age``: their requests died."""
    removed = 0
    for path in node.local.pending_files():
        try:
            if path.stat().st_mtime < now - max_age:
                path.unlink()
                removed += 1
        except FileNotFoundError:
            continue
    return removed


def requeue_stuck(node: Node, *, older_than: float, now: float, limit: int = 1000) -> int:
    state = node.state
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
            if requeue(node, record):
                requeued += 1
    # Deletes whose job was lost: send it again (purging twice is harmless).
    for key in state.keys_in_state("deleted", older_than=older_than, limit=limit):
        record = state.get(key)
        if record is not None and record.state == "deleted":
            with contextlib.suppress(LeaseLost):
                gen = state.transition(key, "deleted", gen=record.gen, from_states=("deleted",))
                node.queue.enqueue_delete(key, gen)
                requeued += 1
    return requeued


def requeue(node: Node, record: FileRecord) -> bool:
    """Queue the transfer again, touching the record so the next sweep leaves it alone."""
    try:
        gen = node.state.transition(
            record.key,
            "queued",
            gen=record.gen,
            from_states=("local", "queued", "transferring", "failed"),
            fields={"lease": "", "lease_until": ""},
        )
    except LeaseLost:
        return False
    node.queue.enqueue_transfer(record.key, gen)
    return True


def retry_failed(node: Node, keys: list[str] | None = None) -> list[str]:
    """``qproxy retry``: queue failed transfers again (all of them without ``keys``)."""
    state = node.state
    targets = keys if keys is not None else state.keys_in_state("failed", limit=100_000)
    done = []
    for key in targets:
        record = state.get(validate_key(key))
        if record is not None and record.state == "failed" and requeue(node, record):
            done.append(key)
    return done


def abort_stale_multipart(node: Node, *, now: float) -> int:
    """Multipart uploads a killed worker left behind (S3 bills their parts)."""
    remote = node.remote
    aborted = 0
    try:
        answer = remote.client.list_multipart_uploads(Bucket=remote.bucket, Prefix=remote.prefix)
    except Exception as exc:  # S3 down: next time
        log.warning("sweep: cannot list multipart uploads: %s", exc)
        return 0
    for upload in answer.get("Uploads", []):
        started = upload["Initiated"].timestamp()
        if started < now - node.config.multipart_max_age:
            with contextlib.suppress(Exception):
                remote.client.abort_multipart_upload(
                    Bucket=remote.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                )
                aborted += 1
    return aborted


@dataclass
class ReconcileReport:
    from_s3: int = 0
    from_journal: int = 0
    from_disk: int = 0
    already_known: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def reconcile(node: Node) -> ReconcileReport:
    """Rebuild records after Redis lost them: S3 first (what is safe), then this node's
    journal and disk (what still has to go)."""
    report = ReconcileReport()
    state, remote = node.state, node.remote
    remote_keys: set[str] = set()
    # The journal is read once: the last commit entry of each key.
    commits = {
        e["key"]: e
        for e in node.local.journal.entries()
        if e.get("op") == "commit" and e.get("key")
    }
    paginator = remote.client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=remote.bucket, Prefix=remote.prefix):
        for obj in page.get("Contents", []):
            key = obj["Key"][len(remote.prefix) :]
            try:
                validate_key(key)
            except QProxyError:
                continue
            remote_keys.add(key)
            if state.get(key) is not None:
                report.already_known += 1
                continue
            try:
                head = remote.client.head_object(Bucket=remote.bucket, Key=obj["Key"])
            except Exception as exc:
                raise RemoteError(f"reconcile: head of {key} failed: {exc}") from exc
            sha = head.get("Metadata", {}).get("sha256", "")
            entry = commits.get(key)
            has_local = node.local.exists(key)
            fields: dict[str, Any] = {
                "node": (entry or {}).get("node", node.config.node_id),
                "size": head["ContentLength"],
                "sha256": sha,
                "filename": (entry or {}).get("filename", ""),
                "content_type": head.get("ContentType", "application/octet-stream"),
                "meta": (entry or {}).get("meta", {}),
                "has_local": has_local,
                "has_remote": True,
                "remote_at": time.time(),
            }
            try:
                state.create(key, "remote", fields)
            except LeaseLost:
                continue
            if has_local:
                keep = max(node.config.keep_local_seconds, node.config.drop_grace_seconds)
                state.redis.zadd(f"{state.prefix}drop:{fields['node']}", {key: time.time() + keep})
            report.from_s3 += 1
    seen: set[str] = set()
    for entry in reversed(list(node.local.journal.entries())):
        key = entry.get("key")
        if not key or key in seen:
            continue
        seen.add(key)
        if entry.get("op") != "commit" or key in remote_keys or state.get(key) is not None:
            continue
        if node.local.exists(key) and restore_local(node, key, entry):
            report.from_journal += 1
    for path in _local_files(node):
        key = path
        if key in seen or key in remote_keys or state.get(key) is not None:
            continue
        size = os.path.getsize(node.local.path_for(key))
        entry = {
            "node": node.config.node_id,
            "node_url": node.config.node_url,
            "size": size,
            "sha256": _sha256(node, key),
        }
        if restore_local(node, key, entry):
            report.from_disk += 1
    return report


def _local_files(node: Node) -> list[str]:
    root = node.local.root
    out = []
    for folder, dirs, files in os.walk(root):
        if folder == str(root):
            dirs[:] = [d for d in dirs if d != ".qp"]
        for name in files:
            rel = os.path.relpath(os.path.join(folder, name), root)
            try:
                out.append(validate_key(rel))
            except QProxyError:
                continue
    return out


def _sha256(node: Node, key: str) -> str:
    import hashlib

    digest = hashlib.sha256()
    with node.local.open(key) as fh:
        while chunk := fh.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()
