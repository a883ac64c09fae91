"""The composition root: one node's stores, built from a :class:`Config` and nothing else.

The middlewares, the resolver, the worker, the Django storage and the CLI each build one
:class:`Stores` and hand it to the functions that do the work (``qproxy/lifecycle/``,
``qproxy/worker/``). Each store is built on first use: a web node that never redirects
never imports boto3.
"""

from __future__ import annotations

from functools import cached_property

from qproxy.config import Config
from qproxy.stores import LocalFiles, Objects, Records, TransferQueue
from qproxy.stores.local import LocalStore


class Stores:
    """This node's local store, the shared records, the bucket and the transfer queue.

    Any of them may be passed in instead (a test's, a user's own implementation).
    """

    def __init__(
        self,
        config: Config | None = None,
        *,
        local: LocalFiles | None = None,
        state: Records | None = None,
        remote: Objects | None = None,
        queue: TransferQueue | None = None,
    ) -> None:
        self.config = config or Config.from_env()
        self.local: LocalFiles = local or LocalStore(
            self.config.local_root, node_id=self.config.node_id
        )
        if state is not None:
            self.state = state
        if remote is not None:
            self.remote = remote
        if queue is not None:
            self.queue = queue

    @cached_property
    def state(self) -> Records:
        from qproxy.stores.state import StateStore

        return StateStore.from_url(self.config.redis_url)

    @cached_property
    def remote(self) -> Objects:
        from qproxy.stores.s3 import RemoteStore

        return RemoteStore(self.config)

    @cached_property
    def queue(self) -> TransferQueue:
        from qproxy.stores.queue import CeleryQueue

        return CeleryQueue(self.config)

    def url_for(self, key: str) -> str:
        """The public URL of ``key`` (nginx and the resolver serve it)."""
        return self.config.public_path + key
