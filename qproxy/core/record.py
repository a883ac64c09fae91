"""A file's record and its states: what Redis holds about one file, as a plain value.

The record is stored as one hash with one-letter field names (:data:`FIELDS`); encoding and
decoding live here, so the store (``qproxy/stores/state.py``) only moves bytes and runs the
compare-and-set scripts. No I/O here.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, cast

State = Literal["pending", "local", "queued", "transferring", "remote", "failed", "deleted"]
STATES: tuple[State, ...] = (
    "pending",
    "local",
    "queued",
    "transferring",
    "remote",
    "failed",
    "deleted",
)
# States in which the only copy is on the origin node's disk.
LOCAL_STATES = frozenset({"local", "queued", "transferring", "failed"})

# A record's fields are stored under one-letter names, times to the millisecond and the
# SHA-256 as base64: ~300 bytes of Redis memory per record instead of ~430 (make bench,
# "state at scale"). Code uses the long names; only this module and the store's Lua
# scripts see the short ones.
FIELDS = {
    "state": "s",
    "gen": "g",
    "node": "n",
    "node_url": "u",
    "size": "z",
    "sha256": "h",
    "filename": "f",
    "content_type": "t",
    "created": "c",
    "updated": "m",
    "attempts": "a",
    "error": "e",
    "lease": "l",
    "lease_until": "d",
    "remote_at": "r",
    "has_local": "L",
    "has_remote": "R",
    "version": "v",
    "hold": "H",
    "stale": "x",
    "meta": "M",
    "private": "P",
    "keep": "k",
    "local_id": "i",
}
_SHORT = {name.encode(): short.encode() for name, short in FIELDS.items()}


def timestamp(t: float) -> str:
    """A time as stored: seconds with milliseconds, rounded down (never later than ``t``:
    a drop scheduled for now is due now, not half a millisecond from now)."""
    ms = int(t * 1000)
    if ms / 1000 > t:  # t * 1000 rounded up in floating point
        ms -= 1
    return f"{ms // 1000}.{ms % 1000:03d}"


@dataclass(frozen=True, slots=True)
class FileRecord:
    """What Redis knows about one file."""

    key: str
    state: State
    gen: int
    node: str = ""
    node_url: str = ""
    size: int = 0
    sha256: str = ""
    filename: str = ""
    content_type: str = "application/octet-stream"
    created: float = 0.0
    updated: float = 0.0
    attempts: int = 0
    error: str = ""
    lease: str = ""
    lease_until: float = 0.0
    remote_at: float = 0.0
    has_local: bool = True
    has_remote: bool = False
    version: int = 1
    hold: bool = False  # stored with delayed=True: transferred only when asked
    private: bool = False  # served only with a signed URL (qproxy.sign_url)
    # Seconds the origin keeps its copy once verified in S3, when the file's writer asked
    # for its own (QueuedStorage(keep_local_seconds=...)); None: the worker's setting.
    keep: float | None = None
    stale: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)
    # Which file on the origin's disk this version is (inode and mtime, see
    # qproxy.stores.local.identity): its janitor removes that file only, never a newer one
    # saved under the name whose record is not written yet.
    local_id: str = ""

    @classmethod
    def from_flat(cls, key: str, flat: list[bytes]) -> FileRecord:
        """From a hash as Redis replies it in a script or a raw HGETALL: name, value, ..."""
        return cls.from_hash(key, dict(zip(flat[::2], flat[1::2], strict=True)))

    @classmethod
    def from_hash(cls, key: str, raw: Mapping[bytes, bytes]) -> FileRecord:
        # Stored under the short names (a hash written with the long ones reads the same).
        h = raw if b"state" not in raw else {_SHORT.get(k, k): v for k, v in raw.items()}
        get = h.get
        sha = get(b"h", b"")
        stale = get(b"x")
        meta = get(b"M")
        keep = get(b"k")
        return cls(
            key=key,
            state=cast(State, get(b"s", b"pending").decode()),
            gen=int(get(b"g", 0)),
            node=get(b"n", b"").decode(),
            node_url=get(b"u", b"").decode(),
            size=int(get(b"z", 0) or 0),
            sha256=base64.urlsafe_b64decode(sha + b"=").hex() if len(sha) == 43 else sha.decode(),
            filename=get(b"f", b"").decode("utf-8", "replace"),
            content_type=get(b"t", b"").decode("utf-8", "replace") or "application/octet-stream",
            created=float(get(b"c", 0) or 0),
            updated=float(get(b"m", 0) or 0),
            attempts=int(get(b"a", 0) or 0),
            error=get(b"e", b"").decode("utf-8", "replace"),
            lease=get(b"l", b"").decode(),
            lease_until=float(get(b"d", 0) or 0),
            remote_at=float(get(b"r", 0) or 0),
            has_local=get(b"L", b"1") == b"1",
            has_remote=get(b"R", b"0") == b"1",
            version=int(get(b"v", 1) or 1),
            hold=get(b"H", b"0") == b"1",
            stale=tuple(n for n in stale.decode().split(",") if n) if stale else (),
            meta=json.loads(meta) if meta else {},
            private=get(b"P", b"0") == b"1",
            keep=float(keep) if keep else None,
            local_id=get(b"i", b"").decode(),
        )

    @property
    def object(self) -> str:
        """This version's S3 object name (before the prefix): each version has its own, so a
        stale upload of an older version can never overwrite the newest bytes."""
        return self.key if self.version <= 1 else f"{self.key}~v{self.version}"

    def as_dict(self) -> dict[str, Any]:
        out = {name: getattr(self, name) for name in self.__dataclass_fields__}
        out.pop("lease")
        out["object"] = self.object
        return out


def encode_fields(fields: Mapping[str, Any]) -> list[str]:
    """Field/value pairs as stored: short names, ``1``/``0`` booleans, JSON metadata,
    millisecond times and a base64 SHA-256."""
    out: list[str] = []
    for name, value in fields.items():
        if isinstance(value, dict):
            value = json.dumps(value, separators=(",", ":"))
        elif isinstance(value, bool):
            value = "1" if value else "0"
        elif isinstance(value, float):
            value = timestamp(value)
        elif name == "sha256" and isinstance(value, str) and len(value) == 64:
            value = base64.urlsafe_b64encode(bytes.fromhex(value)).rstrip(b"=").decode()
        out += [FIELDS.get(name, name), "" if value is None else str(value)]
    return out
