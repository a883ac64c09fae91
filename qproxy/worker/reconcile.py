"""Rebuilding every record after Redis lost them (FLUSHALL, a new empty instance).

``qproxy reconcile`` runs this on each web node: S3's listing first (what is safe there),
then the node's journal and disk (what still has to go).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass
from typing import Any

from qproxy.compose import Stores
from qproxy.errors import KeyExists, QProxyError
from qproxy.keys import validate_key
from qproxy.lifecycle.files import restore


@dataclass
class ReconcileReport:
    from_s3: int = 0
    from_journal: int = 0
    from_disk: int = 0
    already_known: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def reconcile(stores: Stores) -> ReconcileReport:
    """Rebuild records after Redis lost them: S3 first (what is safe), then this node's
    journal and disk (what still has to go)."""
    report = ReconcileReport()
    state, remote = stores.state, stores.remote
    remote_keys: set[str] = set()
    # The journal is read once: the last commit entry of each key.
    commits = {
        e["key"]: e
        for e in stores.local.journal.entries()
        if e.get("op") == "commit" and e.get("key")
    }
    for key in remote.list_keys():
        try:
            validate_key(key)
        except QProxyError:
            continue
        remote_keys.add(key)
        if state.get(key) is not None:
            report.already_known += 1
            continue
        head = remote.head(key)
        if head is None:  # removed since the listing
            continue
        entry = commits.get(key) or {}
        has_local = stores.local.exists(key)
        fields: dict[str, Any] = {
            "node": entry.get("node", stores.config.node_id),
            "size": head.size,
            "sha256": head.sha256,
            "filename": entry.get("filename", ""),
            "content_type": head.content_type,
            "meta": entry.get("meta", {}),
            "has_local": has_local,
            "local_id": stores.local.identity(key) if has_local else "",
            "has_remote": True,
            "remote_at": time.time(),
        }
        try:
            state.create(key, "remote", fields)
        except KeyExists:
            continue
        if has_local:
            keep = max(stores.config.keep_local_seconds, stores.config.drop_grace_seconds)
            state.schedule_drop(fields["node"], key, time.time() + keep)
        report.from_s3 += 1
    seen: set[str] = set()
    for entry in reversed(list(stores.local.journal.entries())):
        key = entry.get("key")
        if not key or key in seen:
            continue
        seen.add(key)
        if entry.get("op") != "commit" or key in remote_keys or state.get(key) is not None:
            continue
        if stores.local.exists(key) and restore(stores, key, entry):
            report.from_journal += 1
    for key in stores.local.stored_keys():
        if key in seen or key in remote_keys or state.get(key) is not None:
            continue
        size = stores.local.size(key)
        entry = {
            "node": stores.config.node_id,
            "node_url": stores.config.node_url,
            "size": size,
            "sha256": _sha256(stores, key),
            "local_id": stores.local.identity(key),
        }
        if restore(stores, key, entry):
            report.from_disk += 1
    return report


def _sha256(stores: Stores, key: str) -> str:
    digest = hashlib.sha256()
    with stores.local.open(key) as fh:
        while chunk := fh.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()
