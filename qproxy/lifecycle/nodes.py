"""The web nodes of a cluster, and draining one that is leaving.

Each node's resolver registers it in Redis every janitor round (its id, URL, when it was
last seen, whether it is draining); ``qproxy nodes`` lists them. ``qproxy drain``, run on a
node that is leaving, marks it draining (a file under its local root, so its middleware
refuses new uploads with 503 without asking Redis), queues the transfer of every file of
this node not yet in S3 (held and failed ones too), waits until none is left, and
deregisters the node: it stays out of the list until ``qproxy drain --cancel``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qproxy.compose import Stores
from qproxy.core import tus
from qproxy.core.record import State
from qproxy.errors import LeaseLost
from qproxy.stores.local import PRIVATE

# A node not seen for this many janitor rounds (and at least GONE_AFTER_SECONDS) is gone.
GONE_AFTER_ROUNDS = 3
GONE_AFTER_SECONDS = 15.0
# How often the middleware looks at the draining mark (a stat), per process.
DRAIN_CHECK_SECONDS = 1.0
_NOT_IN_S3: tuple[State, ...] = ("local", "queued", "transferring", "failed")

_marks: dict[Path, tuple[bool, float]] = {}


@dataclass(frozen=True)
class Node:
    id: str
    url: str
    seen: float
    draining: bool
    tus_url: str = ""

    def age(self, now: float) -> float:
        return max(0.0, now - self.seen)


def _mark(stores: Stores, name: str) -> Path:
    return stores.local.root / PRIVATE / name


def is_draining(stores: Stores) -> bool:
    """This node is being drained (cheap: one stat a second per process)."""
    path = _mark(stores, "draining")
    now = time.monotonic()
    cached = _marks.get(path)
    if cached is not None and cached[1] > now:
        return cached[0]
    found = path.exists()
    _marks[path] = (found, now + DRAIN_CHECK_SECONDS)
    return found


def heartbeat(stores: Stores) -> None:
    """Register this node (its resolver calls this every janitor round)."""
    if _mark(stores, "drained").exists():
        return  # drained and deregistered: it left
    config = stores.config
    stores.state.register_node(
        config.node_id,
        {
            "url": config.node_url,
            "tus_url": config.tus_url,
            "seen": time.time(),
            "draining": _mark(stores, "draining").exists(),
        },
    )


def listing(stores: Stores) -> list[Node]:
    """The registered nodes, by id."""
    return [
        Node(
            id=name,
            url=str(info.get("url", "")),
            seen=float(info.get("seen", 0.0)),
            draining=bool(info.get("draining")),
            tus_url=str(info.get("tus_url", "")),
        )
        for name, info in sorted(stores.state.nodes().items())
    ]


def is_gone(stores: Stores, node: Node, now: float) -> bool:
    limit = max(GONE_AFTER_ROUNDS * stores.config.janitor_interval, GONE_AFTER_SECONDS)
    return node.age(now) > limit


def holding_tus(stores: Stores, tag: str) -> Node | None:
    """The live node whose tus uploads carry ``tag`` (None: gone, drained or unknown)."""
    now = time.time()
    for node in listing(stores):
        if tus.node_tag(node.id) == tag and node.tus_url and not is_gone(stores, node, now):
            return node
    return None


def unfinished(stores: Stores, *, limit: int = 100_000) -> list[str]:
    """This node's files not yet in S3."""
    state = stores.state
    me = stores.config.node_id
    keys: list[str] = []
    for name in _NOT_IN_S3:
        for key in state.keys_in_state(name, limit=limit):
            record = state.get(key)
            if record is not None and record.state in _NOT_IN_S3 and record.node == me:
                keys.append(key)
    return keys


def _queue(stores: Stores, key: str) -> bool:
    """Queue the transfer of one of this node's files, held or failed ones too."""
    record = stores.state.get(key)
    if record is None or record.state not in ("local", "queued", "failed"):
        return False  # transferring: a worker has it
    try:
        gen = stores.state.transition(
            key,
            "queued",
            gen=record.gen,
            from_states=("local", "queued", "failed"),
            fields={"hold": "", "lease": "", "lease_until": ""},
        )
    except LeaseLost:
        return False
    stores.queue.enqueue_transfer(key, gen)
    return True


def drain(
    stores: Stores,
    *,
    timeout: float,
    progress: Callable[[int], None] = lambda left: None,
    poll: float = 1.0,
) -> bool:
    """Drain this node (see the module's doc). False if files were left after ``timeout``
    (the node stays draining: run it again)."""
    stores.local.ensure()
    _mark(stores, "draining").touch()
    _marks.clear()
    heartbeat(stores)
    queued_at: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    while True:
        left = unfinished(stores)
        progress(len(left))
        if not left:
            break
        now = time.monotonic()
        for key in left:
            # Queued once, and again if it sits without a worker for a while (a lost job).
            if queued_at.get(key, 0.0) < now - 30.0 and _queue(stores, key):
                queued_at[key] = now
        if now >= deadline:
            return False
        time.sleep(poll)
    _mark(stores, "drained").touch()
    stores.state.deregister_node(stores.config.node_id)
    return True


def cancel_drain(stores: Stores) -> None:
    """Take uploads again and register (``qproxy drain --cancel``)."""
    for name in ("drained", "draining"):
        with contextlib.suppress(FileNotFoundError):
            _mark(stores, name).unlink()
    _marks.clear()
    heartbeat(stores)
