"""Resumable uploads being received on this node (tus): their bytes and their state, on the
node's own disk, durable before any offset is given to a client.

Each upload is two files in the local root's private folder ``.qp/tus/``: ``ID.bin``, the
bytes so far (appended, then fsynced before the answer that carries the new offset), and
``ID.json``, its state (length, metadata, expiry; written to a temporary name, fsynced
and renamed, so it is whole or absent). The offset is the data file's size: what was
fsynced is what a client is told, kill -9 and power cut included. Nothing here follows a
symlink.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import zlib
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

from qproxy.errors import QProxyError, UploadTooLarge
from qproxy.stores.local import (
    PRIVATE,
    WRITEBACK_STEP,
    Behind,
    LocalStore,
    TempFile,
    _start_writeback,
    _storage_error,
)

_FOLDER = (PRIVATE, "tus")
_OPEN = os.O_CLOEXEC | os.O_NOFOLLOW


class ChecksumMismatch(QProxyError):
    """The bytes of a PATCH do not match its Upload-Checksum (tus answers 460)."""

    status = 460


class OffsetMismatch(QProxyError):
    """A PATCH at an offset other than the upload's (tus answers 409)."""

    status = 409


class _Hasher(Protocol):
    def update(self, data: bytes, /) -> None: ...

    def digest(self) -> bytes: ...


class _Crc32:
    def __init__(self) -> None:
        self.value = 0

    def update(self, data: bytes, /) -> None:
        self.value = zlib.crc32(data, self.value)

    def digest(self) -> bytes:
        return self.value.to_bytes(4, "big")


def hasher(algorithm: str) -> _Hasher:
    if algorithm == "crc32":
        return _Crc32()
    return hashlib.new(algorithm)


def _new_data_file(folder: int, upload_id: str) -> int:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _OPEN
    return os.open(f"{upload_id}.bin", flags, 0o644, dir_fd=folder)


class Partials:
    """The resumable uploads of one node's local store."""

    def __init__(self, local: LocalStore) -> None:
        self.local = local
        self.folder = local.root.joinpath(*_FOLDER)
        # The SHA-256 of each upload's bytes so far, kept as they are appended by this
        # process: a completed upload is then not read again to hash it. After a restart
        # (or PATCHes spread over processes) it is missing, and :meth:`take` reads the file.
        self._hashes: OrderedDict[str, tuple[int, Any]] = OrderedDict()

    def _dir(self) -> int:
        self.local.ensure()
        return self.local._folder(_FOLDER, create=True)

    def create(self, upload_id: str, state: dict[str, Any]) -> None:
        folder = self._dir()
        try:
            os.close(_new_data_file(folder, upload_id))
        except OSError as exc:
            raise _storage_error(exc) from exc
        finally:
            os.close(folder)
        self.save(upload_id, state)

    def save(self, upload_id: str, state: dict[str, Any]) -> None:
        folder = self._dir()
        try:
            self._write_state(folder, upload_id, state)
            os.fsync(folder)
        except OSError as exc:
            raise _storage_error(exc) from exc
        finally:
            os.close(folder)

    def _write_state(self, folder: int, upload_id: str, state: dict[str, Any]) -> None:
        temp = f"{upload_id}.json.{os.getpid()}.tmp"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _OPEN, 0o600, dir_fd=folder)
        try:
            os.write(fd, json.dumps(state, sort_keys=True).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temp, f"{upload_id}.json", src_dir_fd=folder, dst_dir_fd=folder)

    def load(self, upload_id: str) -> tuple[dict[str, Any], int] | None:
        """The upload's state and its offset (the bytes stored), or None."""
        try:
            folder = self.local._folder(_FOLDER)
        except FileNotFoundError:
            return None
        try:
            try:
                fd = os.open(f"{upload_id}.json", os.O_RDONLY | _OPEN, dir_fd=folder)
            except FileNotFoundError:
                return None
            with os.fdopen(fd, "rb") as fh:
                state = json.loads(fh.read())
            try:
                size = os.stat(f"{upload_id}.bin", dir_fd=folder, follow_symlinks=False).st_size
            except FileNotFoundError:
                return None
            return state, size
        finally:
            os.close(folder)

    def append(
        self,
        upload_id: str,
        offset: int,
        chunks: Iterable[bytes],
        *,
        limit: int,
        checksum: tuple[str, bytes] | None = None,
    ) -> int:
        """Append ``chunks`` at ``offset`` (the upload's current size), at most ``limit``
        bytes; fsync; return the new offset. What arrived before a client went away is
        kept (and fsynced), unless the request had a checksum: then all or nothing."""
        folder = self._dir()
        try:
            fd = os.open(f"{upload_id}.bin", os.O_WRONLY | _OPEN, dir_fd=folder)
        finally:
            os.close(folder)
        check = hasher(checksum[0]) if checksum else None
        flushed = 0  # how many of the bytes written have had their writeback started
        running = self._hashes.pop(upload_id, None)
        whole = running[1] if running is not None and running[0] == offset else None
        if whole is None and offset == 0:
            whole = hashlib.sha256()
        if whole is not None and check is not None:
            whole = whole.copy()  # (a mismatch must not leave its bytes in the hash)
        written = 0
        try:
            try:  # one writer at a time, across threads and processes (released on close)
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                raise OffsetMismatch("another request is writing this upload") from exc
            size = os.fstat(fd).st_size
            if size != offset:
                raise OffsetMismatch(f"the upload is at {size}, not {offset}")
            os.lseek(fd, offset, os.SEEK_SET)
            # The SHA-256 runs in a thread of its own beside the writes (both leave the
            # GIL): the tus row of make bench went 0.55-0.62x -> 0.70x of a multipart upload.
            hashing = None
            if whole is not None:
                hashing = Behind(whole.update, depth=8, name="qproxy-tus-hash")
            try:
                for chunk in chunks:
                    if written + len(chunk) > limit:
                        raise UploadTooLarge("the body goes past Upload-Length")
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view) :]
                    if check is not None:
                        check.update(chunk)
                    if hashing is not None:
                        hashing.put(chunk)
                    written += len(chunk)
                    if written - flushed >= WRITEBACK_STEP:
                        # The disk write starts now: the closing fsync has little left.
                        _start_writeback(fd, offset + flushed, written - flushed)
                        flushed = written
            except BaseException:
                if hashing is not None:
                    hashing.stop()
                if checksum is not None or written > limit:
                    os.ftruncate(fd, offset)
                    written = 0
                else:
                    whole = None  # (which bytes reached the file is not known exactly)
                os.fsync(fd)
                if whole is None and running is not None and written == 0:
                    self._remember(upload_id, offset, running[1])
                raise
            if hashing is not None:
                hashing.stop()
                if hashing.error is not None:
                    whole = None  # (then the completed file is read to hash it)
            if check is not None and checksum is not None and check.digest() != checksum[1]:
                os.ftruncate(fd, offset)
                os.fsync(fd)
                if running is not None:
                    self._remember(upload_id, offset, running[1])
                raise ChecksumMismatch("the bytes do not match Upload-Checksum")
            os.fsync(fd)
            if whole is not None:
                self._remember(upload_id, offset + written, whole)
        except OSError as exc:
            raise _storage_error(exc) from exc
        finally:
            os.close(fd)
        return offset + written

    def concatenate(self, upload_id: str, parts: list[str], state: dict[str, Any]) -> int:
        """A new upload whose bytes are ``parts``' in order (each copied in the kernel);
        fsynced. Returns its size."""
        folder = self._dir()
        try:
            out = _new_data_file(folder, upload_id)
            size = 0
            try:
                for part in parts:
                    src = os.open(f"{part}.bin", os.O_RDONLY | _OPEN, dir_fd=folder)
                    try:
                        left = os.fstat(src).st_size
                        while left > 0:
                            copied = os.copy_file_range(src, out, left)
                            if copied == 0:
                                break
                            left -= copied
                            size += copied
                    finally:
                        os.close(src)
                os.fsync(out)
            finally:
                os.close(out)
            self._write_state(folder, upload_id, state)
            os.fsync(folder)
        except OSError as exc:
            raise _storage_error(exc) from exc
        finally:
            os.close(folder)
        return size

    def _remember(self, upload_id: str, offset: int, running: Any) -> None:
        self._hashes[upload_id] = (offset, running)
        while len(self._hashes) > 256:
            self._hashes.popitem(last=False)

    def take(self, upload_id: str, *, max_size: int) -> TempFile:
        """The complete upload as a temp file of the local store (hashed by reading it back
        once: a SHA-256 cannot be carried across a restart), ready to commit."""
        folder = self._dir()
        name = f"{os.urandom(8).hex()}-tus"
        tmp = self.local._folder((PRIVATE, "tmp"), create=True)
        try:
            os.rename(f"{upload_id}.bin", name, src_dir_fd=folder, dst_dir_fd=tmp)
        finally:
            os.close(tmp)
            os.close(folder)
        running = self._hashes.pop(upload_id, None)
        path = self.local.tmp_dir / name
        known = running[1] if running is not None and running[0] == path.stat().st_size else None
        temp = TempFile.adopt(path, max_size=max_size, sha256=known)
        self.remove(upload_id)
        return temp

    def remove(self, upload_id: str) -> bool:
        self._hashes.pop(upload_id, None)
        try:
            folder = self.local._folder(_FOLDER)
        except FileNotFoundError:
            return False
        removed = False
        try:
            for suffix in (".bin", ".json"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f"{upload_id}{suffix}", dir_fd=folder)
                    removed = True
        finally:
            os.close(folder)
        return removed

    def ids(self) -> Iterator[str]:
        try:
            names = os.listdir(self.folder)
        except FileNotFoundError:
            return
        for name in names:
            if name.endswith(".json"):
                yield name[: -len(".json")]

    def path(self, upload_id: str) -> Path:
        return self.folder / f"{upload_id}.bin"
