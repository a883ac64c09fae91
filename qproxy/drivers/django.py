"""Django: ``FileField(storage=QueuedStorage())`` over qproxy's machinery.

``save()`` writes the file to the node's local store and commits it like an upload (journal,
record, transfer job); ``url()`` is the public ``/media/...`` URL that nginx and the resolver
serve from wherever the file is; ``open()`` reads the local copy while there is one, else
streams from S3. Settings come from ``settings.QPROXY`` (names as in the environment,
without the prefix: ``{"S3_BUCKET": "...", "KEEP_LOCAL_SECONDS": 600}``) over the ``QPROXY_*``
environment, read here and nowhere else.
"""

from __future__ import annotations

import io
import os
import posixpath
import re
import tempfile
import threading
import time
import unicodedata
from datetime import UTC, datetime
from typing import IO, Any
from urllib.parse import urljoin

from django.conf import settings
from django.core.exceptions import SuspiciousFileOperation
from django.core.files.base import File
from django.core.files.storage import Storage
from django.core.files.utils import validate_file_name
from django.dispatch import Signal
from django.utils.deconstruct import deconstructible
from django.utils.encoding import filepath_to_uri

from qproxy.compose import Stores
from qproxy.config import Config
from qproxy.core.multipart import clean_content_type, clean_filename
from qproxy.core.record import LOCAL_STATES, FileRecord
from qproxy.errors import ConfigError, InvalidKey, KeyExists
from qproxy.keys import MAX_KEY_BYTES, validate_key
from qproxy.lifecycle import files

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
META_ATTRIBUTE = "qproxy_meta"
MAX_NAME_CHARS = 200
# Options a storage may set for its own files: each file's record carries them, so the
# worker and the resolver honour them too.
PER_FILE_OPTIONS = frozenset({"keep_local_seconds"})
_CHUNK = 1024 * 1024
_FROM_SETTINGS = object()  # base_url not given: the public path qproxy serves

# One Stores (one Redis pool, one S3 client) per distinct settings in a process. A project
# has a storage for each file field, Django's tests make one per test: each built its own
# clients on its first call (a boto3 client is ~0.1-0.2 s of CPU here, more on a busy host,
# all of it inside the first save or exists()).
_shared_stores: dict[Config, Stores] = {}
_shared_lock = threading.Lock()


def _stores_for(config: Config) -> Stores:
    with _shared_lock:
        found = _shared_stores.get(config)
        if found is None:
            found = _shared_stores[config] = Stores(config)
        return found


# Sent in the worker when a file reached S3 (or failed for good), with ``name`` (the key)
# and ``record`` (a dict): set QPROXY_ON_TRANSFERRED / QPROXY_ON_FAILED to
# "qproxy.contrib.django.send_file_transferred" / "...send_file_failed". The names of
# django-queued-storage's signal, for its users.
file_transferred = Signal()
file_failed = Signal()


def _setup_django() -> None:
    from django.apps import apps

    if not apps.ready:  # the worker: receivers live in the project's apps
        import django

        django.setup()


def send_file_transferred(record: dict[str, Any]) -> None:
    """A worker hook (QPROXY_ON_TRANSFERRED): sends :data:`file_transferred`."""
    _setup_django()
    file_transferred.send(sender=QueuedStorage, name=record["key"], record=record)


def send_file_failed(record: dict[str, Any]) -> None:
    """A worker hook (QPROXY_ON_FAILED): sends :data:`file_failed`."""
    _setup_django()
    file_failed.send(sender=QueuedStorage, name=record["key"], record=record)


def attach_meta(content: Any, **meta: Any) -> Any:
    """Attach metadata to a file before ``save()``; the worker hooks receive it."""
    setattr(content, META_ATTRIBUTE, {**getattr(content, META_ATTRIBUTE, {}), **meta})
    return content


@deconstructible(path="qproxy.contrib.django.QueuedStorage")
class QueuedStorage(Storage):
    """Local storage first, S3 later, one name and one URL throughout.

    ``delayed=True`` stores files locally without queueing their transfer: call
    :meth:`transfer` when you want it (as with django-queued-storage). Other keyword
    arguments override qproxy settings for this storage, where every process can honour them
    (``keep_local_seconds``; others are refused with a ConfigError naming them).
    ``base_url`` is where its URLs point (default: ``QPROXY_PUBLIC_PATH``; a CDN in front,
    say), as ``FileSystemStorage(base_url=...)``.
    """

    def __init__(
        self,
        *,
        delayed: bool = False,
        allow_overwrite: bool = False,
        base_url: Any = _FROM_SETTINGS,
        **options: Any,
    ) -> None:
        self.delayed = delayed
        self._base_url = base_url
        # As FileSystemStorage(allow_overwrite=True): a save replaces the file of that name
        # (a new version; static files), instead of taking the next free name.
        self.allow_overwrite = allow_overwrite
        self.options = options
        self._own_options = {k.lower().removeprefix("qproxy_") for k in options}
        self._stores: Stores | None = None
        if options and settings.configured:
            self._config()  # refuse an option only this process would honour, at once

    # -- settings at the edge -------------------------------------------------------------

    @property
    def base_url(self) -> str | None:
        url = self.stores.config.public_path if self._base_url is _FROM_SETTINGS else self._base_url
        if url is not None and not str(url).endswith("/"):
            url = f"{url}/"
        return None if url is None else str(url)

    @base_url.setter
    def base_url(self, value: str | None) -> None:
        self._base_url = value

    @property
    def stores(self) -> Stores:
        if self._stores is None:
            self._stores = _stores_for(self._config())
        return self._stores

    def _config(self) -> Config:
        shared = Config.from_env(overrides=getattr(settings, "QPROXY", {}))
        config = Config.from_env(overrides={**getattr(settings, "QPROXY", {}), **self.options})
        for name in sorted(self.options):
            field = name.lower().removeprefix("qproxy_")
            if field in PER_FILE_OPTIONS or getattr(config, field) == getattr(shared, field):
                continue
            # The worker and the resolver build their settings from the environment and
            # settings.QPROXY, not from this storage: such an option would hold in this
            # process only (a worker writing without the prefix, say).
            raise ConfigError(
                f"QueuedStorage({field}=...) would hold in this process only: set "
                f"QPROXY_{field.upper()} (or settings.QPROXY) for every process instead; "
                f"per storage only {', '.join(sorted(PER_FILE_OPTIONS))} and delayed"
            )
        return config

    # -- names ----------------------------------------------------------------------------

    def get_valid_name(self, name: str) -> str:
        """An ASCII name qproxy accepts as a key (``Résumé 2026.pdf`` -> ``Resume_2026.pdf``).

        Raises SuspiciousFileOperation, as Django's storages do, when nothing usable is left.
        """
        ascii_name = unicodedata.normalize("NFKD", str(name)).encode("ascii", "ignore").decode()
        cleaned = _UNSAFE.sub("_", ascii_name).strip("._")
        if not cleaned:
            raise SuspiciousFileOperation(f"Could not derive file name from {name!r}")
        return _shorten(cleaned, MAX_NAME_CHARS)

    def get_available_name(self, name: str, max_length: int | None = None) -> str:
        if self.allow_overwrite:
            # Django's own loop, as FileSystemStorage(allow_overwrite=True): the name as it
            # is, cut to max_length (its extension kept).
            return super().get_available_name(self._key(name), max_length=max_length)
        return self._free_name(name, max_length)

    def is_name_available(self, name: str, max_length: int | None = None) -> bool:
        if self.allow_overwrite:
            return not (max_length and len(name) > max_length)
        return bool(super().is_name_available(name, max_length=max_length))

    def get_alternative_name(self, file_root: str, file_ext: str) -> str:
        if self.allow_overwrite:
            return f"{file_root}{file_ext}"
        return str(super().get_alternative_name(file_root, file_ext))

    def _free_name(self, name: str, max_length: int | None = None) -> str:
        # Django's loop asks exists() until a name is free; exists() looks at Redis (pending
        # reservations included), the local disk and S3, so a name is never reused while
        # any copy or record remains. Truncation keeps the extension (and so the type).
        key = self._key(name)
        if max_length is not None and len(key) > max_length:
            folder, _, leaf = key.rpartition("/")
            room = max_length - (len(folder) + 1 if folder else 0)
            if room < 1:
                raise SuspiciousFileOperation(
                    f"Storage can not find an available filename for {name!r}"
                )
            key = (folder + "/" if folder else "") + _shorten(leaf, room)
        return super().get_available_name(key, max_length=max_length)

    def _key(self, name: Any) -> str:
        if name is None or name == "":
            raise ValueError("a file name is needed")
        text = os.fspath(name) if isinstance(name, os.PathLike) else str(name)
        # Django's own rule for names: no absolute paths, no '..' (SuspiciousFileOperation).
        validate_file_name(text, allow_relative_path=True)
        key = text.replace("\\", "/").lstrip("/")
        try:
            return validate_key(key)
        except InvalidKey:
            parts = [self.get_valid_name(p) for p in key.split("/") if p.strip(".")]
            return validate_key("/".join(parts)[:MAX_KEY_BYTES] or "file")

    # -- the Storage API ------------------------------------------------------------------

    def _save(self, name: str, content: File[Any]) -> str:
        key = self._key(name)
        stores = self.stores
        reserved: int | None = None
        # The name is claimed before a byte is written: of two saves of one name (threads,
        # processes, nodes) exactly one gets it, the other takes the next free name.
        for _ in range(0 if self.allow_overwrite else 100):
            try:
                reserved = files.reserve(stores, key)
                break
            except KeyExists:
                key = self._free_name(key)
        else:
            if not self.allow_overwrite:
                raise SuspiciousFileOperation(f"no free name for {name!r}")
        if hasattr(content, "seek") and getattr(content, "seekable", lambda: True)():
            content.seek(0)
        # Django's storages take text as UTF-8.
        chunks = (c.encode("utf-8") if isinstance(c, str) else c for c in content.chunks())
        files.store(
            stores,
            chunks,
            key,
            self._fields(key, content),
            enqueue=not self.delayed,
            replace=self.allow_overwrite,
            reserved=reserved,
        )
        return key

    def _fields(self, key: str, content: Any) -> dict[str, Any]:
        original = clean_filename(getattr(content, "name", None) or key.rsplit("/", 1)[-1])
        fields: dict[str, Any] = {
            "filename": original,
            "content_type": clean_content_type(getattr(content, "content_type", None), key),
            "meta": getattr(content, META_ATTRIBUTE, {}),
        }
        if "keep_local_seconds" in self._own_options:
            fields["keep"] = float(self.stores.config.keep_local_seconds)
        return fields

    def _write(self, key: str, body: IO[bytes]) -> None:
        """What ``open(name, "wb")`` wrote, saved under that very name on close (replacing
        the file of that name, as writing to a path does)."""
        chunks = iter(lambda: body.read(_CHUNK), b"")
        files.store(
            self.stores,
            chunks,
            key,
            self._fields(key, None),
            enqueue=not self.delayed,
            replace=True,
        )

    def _open(self, name: str, mode: str = "rb") -> File[Any]:
        key = self._key(name)
        if mode.replace("b", "").replace("t", "") not in ("r", "w"):
            raise ValueError(
                f"QueuedStorage opens files to read ('r', 'rb') or to write a whole "
                f"new file ('w', 'wb'), not {mode!r}"
            )
        return _StoredFile(self, key, mode)

    def _stream(self, key: str) -> IO[bytes]:
        """This version's bytes, from wherever they are: this node's disk, S3 (its versioned
        object), or the origin node. FileNotFoundError for a deleted or reserved name."""
        stores = self.stores
        record = stores.state.get(key)
        if record is None or record.state in ("deleted", "pending"):
            raise FileNotFoundError(key)
        if record.has_local and record.node == stores.config.node_id:
            try:
                return stores.local.open(key)
            except FileNotFoundError:
                pass  # dropped by the janitor since: in S3
        if record.has_remote or record.state == "remote":
            return stores.remote.open(record.object)
        return files.open_copy(stores, record)

    def _record(self, name: str) -> FileRecord | None:
        return self.stores.state.get(self._key(name))

    def exists(self, name: str) -> bool:
        if name in ("", ".", "/"):
            return True  # the storage's root, as FileSystemStorage answers
        key = self._key(name)
        record = self.stores.state.get(key)
        if record is not None:
            # A deleted name is free at once, as after FileSystemStorage.delete(): a new save
            # is a new version with its own S3 object, which no purge of the old one touches.
            return record.state != "deleted"
        if self.stores.local.exists(key) or self.stores.remote.exists(key):
            return True
        # A folder (collectstatic --clear asks): only for names without an extension, as
        # finding one takes a scan of the records.
        if "." not in key.rsplit("/", 1)[-1]:
            return bool(self.stores.state.keys_under(key + "/", limit=1))
        return False

    def delete(self, name: str) -> None:
        """Mark deleted at once (404 from then on); every copy is removed in the background."""
        if not name:
            raise ValueError("The name must be given to delete().")
        files.delete(self.stores, self._key(name))

    def size(self, name: str) -> int:
        record = self._record(name)
        if record is not None and record.state != "deleted":
            return record.size
        key = self._key(name)
        if self.stores.local.exists(key):
            return self.stores.local.size(key)
        raise FileNotFoundError(name)

    def url(self, name: str | None) -> str:
        # As FileSystemStorage.url: encoded, leading slashes removed (no //host URLs).
        base = self.base_url
        if base is None:
            raise ValueError("This file is not accessible via a URL.")
        url = filepath_to_uri(name)
        if url is not None:
            url = url.lstrip("/")
        return urljoin(base, url)

    def path(self, name: str) -> str:
        raise NotImplementedError("QueuedStorage files may live in S3: open() them instead")

    def listdir(self, path: str) -> tuple[list[str], list[str]]:
        """The folders and files directly under ``path`` (from the records: a scan, for
        collectstatic and admin tools, not for request paths)."""
        folder = posixpath.normpath(os.fspath(path).replace("\\", "/"))
        prefix = "" if folder in (".", "/") else self._key(folder) + "/"
        folders: set[str] = set()
        names: list[str] = []
        for key in self.stores.state.keys_under(prefix):
            rest = key[len(prefix) :]
            head, sep, _ = rest.partition("/")
            if sep:
                folders.add(head)
            else:
                names.append(rest)
        return sorted(folders), names

    def get_created_time(self, name: str) -> datetime:
        record = self._record(name)
        if record is None:
            raise FileNotFoundError(name)
        return _when(record.created)

    def get_modified_time(self, name: str) -> datetime:
        # When this version's bytes were written: the record's other changes (queued,
        # transferring, remote) are not changes of the file (collectstatic compares this
        # with its source files' times).
        record = self._record(name)
        if record is None:
            raise FileNotFoundError(name)
        return _when(record.created)

    def get_accessed_time(self, name: str) -> datetime:
        return self.get_modified_time(name)

    # -- django-queued-storage's extras ---------------------------------------------------

    def using_local(self, name: str) -> bool:
        """The file is (still) only on the local disk of its node."""
        record = self._record(name)
        return record is not None and record.state in LOCAL_STATES

    def using_remote(self, name: str) -> bool:
        """The file is verified in S3."""
        record = self._record(name)
        return record is not None and record.state == "remote"

    def transfer(self, name: str) -> bool:
        """Queue the transfer to S3 now (for ``delayed=True`` storages, or to retry)."""
        return files.enqueue(self.stores, self._key(name))

    def wait_remote(self, name: str, timeout: float = 60.0) -> bool:
        """Block until the file is remote (for scripts and tests); False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.using_remote(name):
                return True
            time.sleep(0.1)
        return False


def _when(timestamp: float) -> datetime:
    """As Django's storages answer: aware UTC with USE_TZ, naive local time without."""
    return datetime.fromtimestamp(timestamp, UTC if settings.USE_TZ else None)


def _shorten(name: str, limit: int) -> str:
    """``name`` cut to ``limit`` characters, its extension kept."""
    if len(name) <= limit:
        return name
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem or len(ext) + 2 > limit:
        return name[:limit]
    return stem[: limit - len(ext) - 1] + "." + ext


class _StoredFile(File):  # type: ignore[type-arg]
    """A file of the storage, opened to read (text modes as UTF-8) or to write a whole new
    file (``w``, ``wb``: spooled to a temporary file, on disk past 1 MiB, and saved under its
    name on close, replacing the file of that name as writing to a path does). It can be
    opened again (a FieldFile reopens it), always from the storage, never from a
    same-named file in the working directory."""

    def __init__(self, storage: QueuedStorage, key: str, mode: str) -> None:
        self._storage = storage
        self._key = key
        self._body: IO[bytes] | None = None
        super().__init__(None, name=key)
        self._start(mode)

    def _start(self, mode: str) -> None:
        if "w" in mode:
            self._body = body = tempfile.SpooledTemporaryFile(max_size=_CHUNK)  # noqa: SIM115
            self.file = body if "b" in mode else io.TextIOWrapper(body, encoding="utf-8")
        else:
            stream = self._storage._stream(self._key)
            self.file = stream if "b" in mode else io.TextIOWrapper(stream, encoding="utf-8")
        self.mode = mode

    def open(self, mode: str | None = None, *args: Any, **kwargs: Any) -> _StoredFile:
        if mode is None and not self.closed and self._body is None:
            self.seek(0)
            return self
        writing = self._body is not None
        self.close()
        self._start(mode or ("rb" if writing else self.mode))
        return self

    def close(self) -> None:
        body, self._body = self._body, None
        file = self.file
        if file is None:
            return
        try:
            if body is not None and not file.closed:
                file.flush()
                body.seek(0)
                self._storage._write(self._key, body)
        finally:
            file.close()
