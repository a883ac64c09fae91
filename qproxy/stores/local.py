"""The node's local store: atomic writes under one root, and the node's durable journal.

Files are written to ``<root>/.qp/tmp/`` while the request is running (state ``pending``),
then renamed to ``<root>/<key>`` when the app accepts them. Files are 0644 and folders 0755
whatever the umask: nginx, started as root, reads them as ``nobody``.

Placing a file and removing one hold a lock of the key's stripe (``<root>/.qp/locks/``,
``flock``): shared by writers, exclusive for a removal that names the very file it removes
(its :func:`identity`). The janitor's record may be older than the disk (a file saved
again under a deleted name, its record not written yet): it removes only the file that
record describes.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import os
import queue
import re
import stat
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, cast

from qproxy.errors import (
    InsufficientStorage,
    MalformedUpload,
    QProxyError,
    UnsafePath,
    UploadTooLarge,
)
from qproxy.keys import validate_key

FILE_MODE = 0o644
DIR_MODE = 0o755
PRIVATE = ".qp"
ADOPT_READ = 1024 * 1024
WRITEBACK_STEP = 8 * 1024 * 1024
# From this size on, a file's SHA-256 runs in a thread of its own, beside the writes, at
# most HASH_DEPTH pieces of HASH_PIECE bytes behind: 2 MiB whatever the chunking (it was 32
# chunks of any size: 8 MiB with 256 KiB reads, and a test saw 8.3 MiB peak on a busy machine).
HASH_THREAD_FROM = 1024 * 1024
HASH_PIECE = 256 * 1024
HASH_DEPTH = 8
_NODE_RE = re.compile(r"[^A-Za-z0-9._-]")
# Every file qproxy creates or reads under the root: never through a symlink (a planted
# link would make uploads land outside the root, or serve what it points to).
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW
# Read-only is enough for flock, and lets a janitor of another user take a writer's lock.
_LOCK_FILE = os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
LOCK_STRIPES = 64


def identity(info: os.stat_result) -> str:
    """Which file this is, not only which name: inode and modification time. A file saved
    again under the same name is another inode (written beside it, renamed over it)."""
    return f"{info.st_ino:x}.{info.st_mtime_ns:x}"


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):  # not Linux
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    fn.restype = ctypes.c_int
    return cast(Callable[[int, int, int, int], int], fn)


_sync_file_range = _load_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Start the disk write of a written range without waiting or dropping it from the page
    cache (Linux sync_file_range): the fsync that makes the file durable then has little
    left to do. Measured: ASGI upload of 256 MiB ~490 -> ~600 MiB/s. Only a head start:
    the closing fsync still decides durability, so failure here is ignored."""
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def _fsync(fd: int, failed: list[OSError]) -> None:
    try:
        os.fsync(fd)
    except OSError as exc:
        failed.append(exc)


def _storage_error(exc: OSError) -> Exception:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return InsufficientStorage("local disk full: the upload could not be stored")
    return exc


class Behind:
    """Calls ``fn`` on each item in a thread of its own, in order, at most ``depth`` items
    behind the caller: two steps that both leave the GIL (hashing and writing, parsing
    and reading) then take the longer of the two instead of their sum.

    The first exception ``fn`` raises is kept (``error``) and later items are dropped;
    :meth:`put` raises it as soon as it is known. :meth:`stop` waits for the thread.
    """

    def __init__(self, fn: Callable[[Any], object], *, depth: int, name: str) -> None:
        self._fn = fn
        self._queue: queue.Queue[tuple[Any] | None] = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def put(self, item: Any) -> None:
        if self.error is not None:
            raise self.error
        self._queue.put((item,))

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        while (entry := self._queue.get()) is not None:
            if self.error is None:
                try:
                    self._fn(entry[0])
                except BaseException as exc:  # handed to the caller's thread
                    self.error = exc


class TempFile:
    """A file being written: counts its size and sha256 as the bytes stream in."""

    def __init__(self, path: Path, *, create: bool = True, fd: int | None = None) -> None:
        self.path = path
        self.size = 0
        self._hash = hashlib.sha256()
        self._hasher: Behind | None = None
        self._fh: IO[bytes] | None = None
        self._flushed = 0
        if create and fd is None:
            fd = os.open(path, _NEW_FILE, FILE_MODE)
        if fd is not None:
            os.fchmod(fd, FILE_MODE)
            self._fh = os.fdopen(fd, "wb", buffering=0)

    @classmethod
    def adopt(cls, path: Path, *, max_size: int, sha256: Any = None) -> TempFile:
        """A complete file someone else wrote (nginx, in offload mode), already moved into
        the temp folder: hashed, made 0644 and flushed to stable storage here. ``sha256``:
        its hash, already computed as it was written (then it is not read again)."""
        temp = cls(path, create=False)
        if sha256 is not None:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            except OSError as exc:
                raise _storage_error(exc) from exc
            try:
                temp.size = os.fstat(fd).st_size
                os.fchmod(fd, FILE_MODE)
                os.fsync(fd)
            finally:
                os.close(fd)
            temp._hash = sha256
            return temp
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)  # (in a checked folder)
        except OSError as exc:
            raise _storage_error(exc) from exc
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise MalformedUpload("the offloaded body is not a regular file")
            if info.st_size > max_size:
                raise UploadTooLarge(f"upload larger than {max_size} bytes")
            os.fchmod(fd, FILE_MODE)  # nginx writes 0600: stored files are 0644
            # nginx does not fsync: the upload is durable only from here. The flush runs
            # beside the hashing (both leave the GIL): measured 134 + 83 ms -> 140 ms for
            # 256 MiB.
            failed: list[OSError] = []
            flusher = threading.Thread(target=_fsync, args=(fd, failed), daemon=True)
            flusher.start()
            try:
                buf = bytearray(ADOPT_READ)
                view = memoryview(buf)
                while n := os.readv(fd, [buf]):
                    temp._hash.update(view[:n])
                    temp.size += n
            finally:
                flusher.join()
            if failed:
                raise failed[0]
        except OSError as exc:
            raise _storage_error(exc) from exc
        finally:
            os.close(fd)
        return temp

    @property
    def sha256(self) -> str:
        self._finish_hash()
        return self._hash.hexdigest()

    def _finish_hash(self) -> None:
        if self._hasher is not None:
            self._hasher.stop()
            self._hasher = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert self._fh is not None, "write after close"
        try:
            view = memoryview(data)
            while view:
                written = self._fh.write(view)
                view = view[written or 0 :]
        except OSError as exc:
            raise _storage_error(exc) from exc
        if self._hasher is None and self.size >= HASH_THREAD_FROM:
            self._hasher = Behind(self._hash.update, depth=HASH_DEPTH, name="qproxy-hash")
        if self._hasher is not None:
            # Queued, so it must not change under the hasher: bytes are copied only if
            # the caller passed something mutable; a big chunk goes in pieces (views).
            chunk = data if isinstance(data, bytes) else bytes(data)
            if len(chunk) <= HASH_PIECE:
                self._hasher.put(chunk)
            else:
                whole = memoryview(chunk)
                for start in range(0, len(chunk), HASH_PIECE):
                    self._hasher.put(whole[start : start + HASH_PIECE])
        else:
            self._hash.update(data)
        self.size += len(data)
        if self.size - self._flushed >= WRITEBACK_STEP:
            _start_writeback(self._fh.fileno(), self._flushed, self.size - self._flushed)
            self._flushed = self.size

    def close(self) -> None:
        """Flush to stable storage and close."""
        if self._fh is None:
            return
        try:
            os.fsync(self._fh.fileno())  # the hash thread finishes meanwhile
        except OSError as exc:
            raise _storage_error(exc) from exc
        finally:
            self._fh.close()
            self._fh = None
            self._finish_hash()

    def discard(self) -> None:
        self._finish_hash()
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


class LocalStore:
    """Files of one node under one root folder.

    Every path below the root is walked from a handle of the root, one folder at a time,
    without following symlinks (``openat`` with ``O_NOFOLLOW``): a link planted for a date
    folder, ``.qp/tmp`` or a file is refused, never followed. The root itself may be a link
    (the operator's choice).
    """

    def __init__(self, root: str | os.PathLike[str], *, node_id: str = "node") -> None:
        self.root = Path(root).absolute()
        self.node_id = node_id
        self.tmp_dir = self.root / PRIVATE / "tmp"
        # Where nginx writes raw bodies in offload mode (same filesystem: adopting is a rename).
        self.offload_dir = self.root / PRIVATE / "offload"
        journal_name = f"{_NODE_RE.sub('_', node_id)}.jsonl"
        self.journal = Journal(self.root / PRIVATE / "journal" / journal_name)
        self._ready = False

    def ensure(self) -> None:
        """Create the root and private folders (idempotent); refuse links among them."""
        if self._ready:
            return
        _makedir(self.root)
        for parts in ((PRIVATE,), (PRIVATE, "tmp"), (PRIVATE, "journal"), (PRIVATE, "locks")):
            os.close(self._folder(parts, create=True))
        self._ready = True

    def path_for(self, key: str) -> Path:
        """The absolute path of ``key``; never outside the root."""
        validate_key(key)
        path = self.root / key
        # Belt and braces on top of validate_key: a key can never climb out of the root.
        if os.path.commonpath([self.root, path]) != str(self.root):
            raise ValueError("path outside the storage root")
        return path

    # -- walking the tree by handles ------------------------------------------------------

    def _folder(self, parts: tuple[str, ...] | list[str], *, create: bool = False) -> int:
        """A handle of the folder ``root/parts...``, reached without following a link.

        Raises FileNotFoundError if a folder is missing (and not ``create``),
        :class:`UnsafePath` if one is a symlink or not a folder.
        """
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for part in parts:
                try:
                    child = os.open(part, _DIR, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(part, DIR_MODE, dir_fd=fd)
                    child = os.open(part, _DIR, dir_fd=fd)
                    os.fchmod(child, DIR_MODE)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise UnsafePath(
                            f"{self.root.joinpath(*parts)}: a symlink or a file where a "
                            "folder should be under the local root"
                        ) from exc
                    raise
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _parent(self, key: str, *, create: bool = False) -> tuple[int, str]:
        """A handle of ``key``'s folder and the file's name in it."""
        parts = validate_key(key).split("/")
        return self._folder(parts[:-1], create=create), parts[-1]

    @contextlib.contextmanager
    def _locked(self, key: str, how: int) -> Iterator[None]:
        """Hold ``key``'s stripe lock (``fcntl.LOCK_SH`` or ``LOCK_EX``). The lock file is
        opened here, not kept: a lock taken on a descriptor a forked process shares would
        be another process's too."""
        folder = self._folder((PRIVATE, "locks"), create=True)
        try:
            stripe = f"{zlib.crc32(key.encode()) % LOCK_STRIPES:02x}"
            fd = os.open(stripe, _LOCK_FILE, FILE_MODE, dir_fd=folder)
        finally:
            os.close(folder)
        try:
            fcntl.flock(fd, how)
            yield
        finally:
            os.close(fd)  # (and the lock with it)

    # -- files ----------------------------------------------------------------------------

    def create_temp(self) -> TempFile:
        self.ensure()
        name = f"{time.time_ns():x}-{os.getpid()}-{os.urandom(6).hex()}"
        try:
            folder = self._folder((PRIVATE, "tmp"), create=True)
            try:
                fd = os.open(name, _NEW_FILE, FILE_MODE, dir_fd=folder)
            finally:
                os.close(folder)
            return TempFile(self.tmp_dir / name, fd=fd)
        except OSError as exc:
            raise _storage_error(exc) from exc

    def _offloaded(self, body_file: str) -> Path:
        src = Path(body_file)
        # nginx names its files itself; anything outside its folder is refused outright.
        real = Path(os.path.realpath(src))
        if not src.is_absolute() or real.parent != Path(os.path.realpath(self.offload_dir)):
            raise MalformedUpload("the offloaded body is not in the offload folder")
        return real

    def open_offloaded(self, body_file: str) -> IO[bytes]:
        """Read a body nginx wrote to :attr:`offload_dir` (a form posted to a raw path)."""
        real = self._offloaded(body_file)
        try:
            fd = os.open(real, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise MalformedUpload("the offloaded body is gone") from None
        except OSError as exc:
            raise _storage_error(exc) from exc
        return os.fdopen(fd, "rb")

    def adopt(self, body_file: str, *, max_size: int) -> TempFile:
        """Take over a body nginx wrote to :attr:`offload_dir` (offload mode)."""
        self.ensure()
        real = self._offloaded(body_file)
        name = f"{time.time_ns():x}-{os.getpid()}-{os.urandom(6).hex()}"
        folder = self._folder((PRIVATE, "tmp"))
        try:
            os.rename(real, name, dst_dir_fd=folder)  # nginx's cleanup then finds nothing
        except FileNotFoundError:
            raise MalformedUpload("the offloaded body is gone") from None
        except OSError as exc:
            raise _storage_error(exc) from exc
        finally:
            os.close(folder)
        dest = self.tmp_dir / name
        try:
            return TempFile.adopt(dest, max_size=max_size)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(dest)
            raise

    def commit(self, temp: TempFile, key: str) -> str:
        """Move a closed temp file to its key's path, durably. Returns the file's
        :func:`identity`, for :meth:`remove`'s ``expect``."""
        self.path_for(key)
        try:
            with self._locked(key, fcntl.LOCK_SH):
                src = self._folder((PRIVATE, "tmp"))
                try:
                    ident = identity(os.stat(temp.path.name, dir_fd=src, follow_symlinks=False))
                    self._place(src, temp.path.name, key)
                finally:
                    os.close(src)
        except OSError as exc:
            raise _storage_error(exc) from exc
        return ident

    def _place(self, src: int, temp_name: str, key: str) -> None:
        for attempt in range(3):
            try:
                dst, name = self._parent(key, create=True)
                try:
                    os.replace(temp_name, name, src_dir_fd=src, dst_dir_fd=dst)
                    os.fsync(dst)
                    return
                finally:
                    os.close(dst)
            except FileNotFoundError:
                # A folder on the way removed meanwhile (the janitor tidying one it emptied
                # of its last file): made again.
                if attempt == 2:
                    raise

    def _stat_file(self, key: str) -> os.stat_result:
        """The stat of the regular file under ``key`` (FileNotFoundError if none: a link or
        a folder is none)."""
        folder, name = self._parent(key)
        try:
            info = os.stat(name, dir_fd=folder, follow_symlinks=False)
        finally:
            os.close(folder)
        if not stat.S_ISREG(info.st_mode):
            raise FileNotFoundError(key)
        return info

    def identity(self, key: str) -> str:
        """The :func:`identity` of the file stored under ``key`` (FileNotFoundError if none)."""
        return identity(self._stat_file(key))

    def exists(self, key: str) -> bool:
        """A regular file (not a link, not a folder) is stored under ``key``."""
        try:
            folder, name = self._parent(key)
        except (QProxyError, OSError):
            return False
        try:
            return stat.S_ISREG(os.stat(name, dir_fd=folder, follow_symlinks=False).st_mode)
        except OSError:
            return False
        finally:
            os.close(folder)

    def size(self, key: str) -> int:
        return self._stat_file(key).st_size

    def open(self, key: str) -> IO[bytes]:
        folder, name = self._parent(key)
        try:
            fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=folder)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnsafePath(f"{key}: a symlink under the local root") from exc
            raise
        finally:
            os.close(folder)
        return os.fdopen(fd, "rb")

    def remove(self, key: str, *, expect: str = "") -> bool:
        """Delete the local copy of ``key``; True if a file was removed. With ``expect`` (the
        :func:`identity` :meth:`commit` returned), only that very file: another one under
        the name (saved again since) is left where it is."""
        parts = validate_key(key).split("/")
        try:
            folder = self._folder(parts[:-1])
        except FileNotFoundError:
            return False
        try:
            with self._locked(key, fcntl.LOCK_EX):  # no file placed meanwhile
                if expect:
                    info = os.stat(parts[-1], dir_fd=folder, follow_symlinks=False)
                    if identity(info) != expect:
                        return False
                os.unlink(parts[-1], dir_fd=folder)  # (unlink never follows a link)
        except FileNotFoundError:
            return False
        finally:
            os.close(folder)
        # Tidy empty date folders, never the root itself.
        for depth in range(len(parts) - 1, 0, -1):
            try:
                parent = self._folder(parts[: depth - 1])
            except OSError:
                break
            try:
                os.rmdir(parts[depth - 1], dir_fd=parent)
            except OSError:
                break
            finally:
                os.close(parent)
        return True

    def pending(self) -> Iterator[tuple[str, float]]:
        """Temp files of requests still running (or of requests that died): name, mtime."""
        try:
            folder = self._folder((PRIVATE, "tmp"))
        except FileNotFoundError:
            return
        try:
            with os.scandir(folder) as entries:
                found = [
                    (e.name, e.stat(follow_symlinks=False).st_mtime)
                    for e in entries
                    if e.is_file(follow_symlinks=False)
                ]
        finally:
            os.close(folder)
        yield from found

    def pending_files(self) -> list[Path]:
        """The paths of :meth:`pending`'s temp files."""
        return [self.tmp_dir / name for name, _ in self.pending()]

    def remove_temp(self, name: str) -> None:
        folder = self._folder((PRIVATE, "tmp"))
        try:
            os.unlink(name, dir_fd=folder)
        finally:
            os.close(folder)

    def stored_keys(self) -> Iterator[str]:
        """Every stored key (regular files only; links and qproxy's own folder skipped)."""
        for folder, dirs, files in os.walk(self.root):
            if folder == str(self.root):
                dirs[:] = [d for d in dirs if d != PRIVATE]
            for name in files:
                rel = os.path.relpath(os.path.join(folder, name), self.root)
                try:
                    key = validate_key(rel)
                except QProxyError:
                    continue
                if self.exists(key):
                    yield key


class Journal:
    """An append-only, fsynced JSON-lines log of what this node accepted.

    It is written before Redis, so the records can be rebuilt if Redis loses them.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, entry: dict[str, Any]) -> None:
        line = json.dumps(entry, separators=(",", ":"), sort_keys=True).encode() + b"\n"
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            fd = os.open(self.path, flags, 0o640)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise _storage_error(exc) from exc

    def offset_since(self, ts: float) -> int:
        """The offset of a line written about ``ts`` or a little before (a binary search
        on the entries' times, which are appended in order, give or take a few ms)."""
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return 0
        low, high = 0, size
        with open(self.path, "rb") as fh:
            while high - low > 4096:
                middle = (low + high) // 2
                fh.seek(middle)
                fh.readline()  # to the start of the next whole line
                start = fh.tell()
                line = fh.readline()
                try:
                    when = float(json.loads(line).get("ts", 0))
                except (ValueError, AttributeError):
                    when = 0.0
                if not line or when >= ts:
                    high = middle
                else:
                    low = start
        return low

    def entries(self) -> Iterator[dict[str, Any]]:
        if not self.path.exists():
            return
        with open(self.path, "rb") as fh:
            for line in fh:
                try:
                    yield json.loads(line)
                except ValueError:
                    continue  # a torn last line after a crash


def _makedir(path: Path) -> None:
    try:
        path.mkdir(mode=DIR_MODE)
    except FileExistsError:
        return
    except FileNotFoundError:
        path.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        path.mkdir(mode=DIR_MODE, exist_ok=True)
    os.chmod(path, DIR_MODE)
