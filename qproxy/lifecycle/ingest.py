"""The uploads of one request: bytes in, files on disk, then commit or discard.

:func:`begin` asks the upload policy (:mod:`qproxy.core.upload`) what to do with a request
and returns an :class:`Intake`; the adapter feeds it the body, shows the app the rewritten
form, and carries out what :class:`qproxy.core.upload.Settle` decides.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Iterable

from qproxy import metrics
from qproxy.compose import Stores
from qproxy.config import Config
from qproxy.core.multipart import FileData, FileEnd, FileStart, RawBodyRewriter
from qproxy.core.upload import (
    Limits,
    Outcome,
    Plan,
    Policy,
    StoredFile,
    UploadRequest,
    plan,
)
from qproxy.errors import NodeDraining
from qproxy.lifecycle import nodes
from qproxy.lifecycle.files import commit
from qproxy.stores.local import Behind, TempFile

log = logging.getLogger("qproxy")

FEED_SLICE = 128 * 1024
OFFLOAD_READ = 1024 * 1024


@functools.cache
def policy_of(config: Config) -> Policy:
    """What a node with ``config`` accepts."""
    return Policy(
        Limits(config.max_upload_bytes, config.max_parts, config.max_form_memory),
        raw_paths=config.raw_paths,
        upload_paths=config.upload_globs,
        secret=config.secret,
    )


def begin(stores: Stores, request: UploadRequest) -> Intake | None:
    """An :class:`Intake` if the request carries uploads, else None (pass it through).

    An offloaded body (nginx wrote it to disk) is taken here, hashed and fsynced: call it
    off the event loop when ``request.body_file`` is set. Raises the policy's refusals
    (:class:`qproxy.errors.QProxyError` subclasses).
    """
    taken = plan(request, policy_of(stores.config))
    if taken is None:
        return None
    if nodes.is_draining(stores):
        raise NodeDraining("this node is being drained: upload to another one")
    intake = Intake(stores, taken)
    if not taken.offloaded:
        return intake
    try:
        if not taken.body_file:  # nginx writes no file for an empty body
            intake.feed(b"")
        elif isinstance(taken.rewriter, RawBodyRewriter):
            intake.adopt(taken.body_file)
        else:  # a form posted to a raw path: parsed from nginx's file
            with stores.local.open_offloaded(taken.body_file) as fh:
                while chunk := fh.read(OFFLOAD_READ):
                    intake.feed(chunk)
            intake.feed(b"")
    except BaseException:
        intake.discard()
        raise
    return intake


class Intake:
    """The uploads of one request, from the first byte to commit or discard."""

    def __init__(self, stores: Stores, taken: Plan) -> None:
        self.stores = stores
        self.plan = taken
        self.rewriter = taken.rewriter
        self.files: list[StoredFile] = []
        self._temps: list[tuple[StoredFile, TempFile]] = []
        self._current: tuple[FileStart, TempFile] | None = None
        self._settled = False
        self._started = time.monotonic()

    @classmethod
    def of_file(cls, stores: Stores, temp: TempFile, *, filename: str, content_type: str) -> Intake:
        """The intake of one complete file received otherwise (a finished tus upload):
        handed to the app as a raw-body upload is, committed as its answer decides."""
        rewriter = RawBodyRewriter(
            field="file",
            filename=filename,
            content_type=content_type,
            max_body=stores.config.max_upload_bytes,
        )
        intake = cls(stores, Plan(rewriter=rewriter, offloaded=True))
        rewriter.finish()
        intake._keep(rewriter.start, temp)
        return intake

    @property
    def offloaded(self) -> bool:
        """The body is already stored (nginx wrote it): the adapter reads none."""
        return self.plan.offloaded

    @property
    def raw_key(self) -> str | None:
        return self.plan.raw_key

    def feed(self, data: bytes) -> None:
        """Next bytes of the body (``b""`` at the end). Raises QProxyError subclasses."""
        if len(data) > FEED_SLICE:
            # The decoder searches, copies and trims its buffer on every call: fed 128 KiB at
            # a time it parses ~2x faster than fed 256 KiB or 1 MiB (measured: 740 vs 345
            # MiB/s; the working set stays in the CPU cache).
            for offset in range(0, len(data), FEED_SLICE):
                self.feed(data[offset : offset + FEED_SLICE])
            return
        local = self.stores.local
        for event in self.rewriter.feed(data):
            if isinstance(event, FileData):
                assert self._current is not None
                self._current[1].write(event.data)
            elif isinstance(event, FileStart):
                local.ensure()
                self._current = (event, local.create_temp())
            elif isinstance(event, FileEnd):
                assert self._current is not None
                start, temp = self._current
                self._current = None
                if not event.keep:
                    temp.discard()
                    continue
                temp.close()
                self._keep(start, temp)

    def _keep(self, start: FileStart, temp: TempFile) -> None:
        """A complete, durable file of this request (committed if the app accepts)."""
        stored = StoredFile(
            field=start.field,
            key=start.key,
            filename=start.filename,
            content_type=start.content_type,
            size=temp.size,
            sha256=temp.sha256,
            url=self.stores.url_for(start.key),
        )
        self.files.append(stored)
        self._temps.append((stored, temp))

    def adopt(self, body_file: str) -> None:
        """Take a raw body nginx wrote to disk as this request's one file."""
        assert isinstance(self.rewriter, RawBodyRewriter)
        start = self.rewriter.start
        temp = self.stores.local.adopt(body_file, max_size=self.rewriter.max_body)
        self.rewriter.finish()
        self._keep(start, temp)

    def body(self) -> bytes:
        """What the app reads as the request body (the rewritten form, or nothing)."""
        return self.rewriter.body()

    def settle(self, outcome: Outcome | None) -> None:
        """Carry out what :class:`qproxy.core.upload.Settle` decided (None: nothing yet)."""
        if outcome == "commit":
            self.commit()
        elif outcome == "discard":
            self.discard()

    def commit(self) -> None:
        """The app accepted the request: make every file durable and queue it."""
        if self._settled:
            return
        self._settled = True
        for stored, temp in self._temps:
            commit(
                self.stores,
                temp,
                stored.key,
                {
                    "filename": stored.filename,
                    "content_type": stored.content_type,
                    "meta": stored.meta,
                    **({"private": True} if stored.private else {}),
                },
            )
        self._count("kept")

    def _count(self, outcome: str) -> None:
        if self.files:
            seconds = time.monotonic() - self._started
            for stored in self.files:
                metrics.upload(outcome, stored.size, seconds)

    def discard(self) -> None:
        """The app refused the request (or it broke): leave nothing behind."""
        if self._settled:
            return
        self._settled = True
        self._count("discarded")
        temps: Iterable[TempFile] = [t for _, t in self._temps]
        if self._current is not None:
            temps = [*temps, self._current[1]]
            self._current = None
        for temp in temps:
            try:
                temp.discard()
            except OSError as exc:  # pragma: no cover - the disk went away
                log.warning("qproxy: could not remove %s: %s", temp.path, exc)


class Feeder:
    """Feeds an intake from a helper thread, one chunk behind the caller, so reading the
    body from the socket and parsing, hashing and writing it use two cores.

    Use as a context manager; leaving it waits for the thread, and re-raises the error a
    feed raised (``put`` raises it too, as soon as it is known). A body of one chunk never
    starts the thread. At most three chunks are held: the one read, one queued, one fed.
    """

    def __init__(self, intake: Intake) -> None:
        self._intake = intake
        self._behind: Behind | None = None
        self._held: bytes | None = None

    def __enter__(self) -> Feeder:
        return self

    def put(self, data: bytes) -> None:
        """The next chunk of the body; ``b""`` ends it."""
        if self._behind is not None:
            self._behind.put(data)
        elif self._held is None and data:
            self._held = data  # maybe the whole body: wait for the next call to know
        elif not data:  # the body was one chunk, or none
            if self._held is not None:
                self._intake.feed(self._held)
                self._held = None
            self._intake.feed(data)
        else:
            self._behind = Behind(self._intake.feed, depth=1, name="qproxy-feed")
            self._behind.put(self._held)
            self._held = None
            self._behind.put(data)

    def __exit__(self, *exc_info: object) -> None:
        if self._behind is None:
            return
        self._behind.stop()
        if self._behind.error is not None and exc_info[0] is None:
            raise self._behind.error
