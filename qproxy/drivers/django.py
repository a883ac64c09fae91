"""Django: ``FileField(storage=QueuedStorage())`` over qproxy's machinery.

``save()`` writes the file to the node's local store and commits it like an upload (journal,
record, transfer job); ``url()`` is the public ``/media/...`` URL that nginx and the resolver
serve from wherever the file is; ``open()`` reads the local copy while there is one, else
streams from S3. Settings come from ``settings.QPROXY`` (names as in the environment,
without the prefix: ``{"S3_BUCKET": "...", "KEEP_LOCAL_SECONDS": 600}``) over the ``QPROXY_*``
environment, read here and nowhere else.
"""

from __future__ import annotations

import re
import time
import unicodedata
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from django.conf import settings
from django.core.files.base import File
from django.core.files.storage import Storage
from django.utils.deconstruct import deconstructible

from qproxy.compose import Stores
from qproxy.config import Config
from qproxy.core.multipart import clean_content_type, clean_filename
from qproxy.core.record import LOCAL_STATES, FileRecord
from qproxy.errors import InvalidKey
from qproxy.keys import MAX_KEY_BYTES, validate_key
from qproxy.lifecycle import files

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
META_ATTRIBUTE = "qproxy_meta"


def attach_meta(content: Any, **meta: Any) -> Any:
    """Attach metadata to a file before ``save()``; the worker hooks receive it."""
    setattr(content, META_ATTRIBUTE, {**getattr(content, META_ATTRIBUTE, {}), **meta})
    return content


@deconstructible(path="qproxy.contrib.django.QueuedStorage")
class QueuedStorage(Storage):
    """Local storage first, S3 later, one name and one URL throughout.

    ``delayed=True`` stores files locally without queueing their transfer: call
    :meth:`transfer` when you want it (as with django-queued-storage). Other keyword
    arguments override qproxy settings for this storage (``QueuedStorage(s3_prefix="img/")``).
    """

    def __init__(self, *, delayed: bool = False, **options: Any) -> None:
        self.delayed = delayed
        self.options = options
        self._stores: Stores | None = None

    # -- settings at the edge -------------------------------------------------------------

    @property
    def stores(self) -> Stores:
        if self._stores is None:
            overrides = {**getattr(settings, "QPROXY", {}), **self.options}
            self._stores = Stores(Config.from_env(overrides=overrides))
        return self._stores

    # -- names ----------------------------------------------------------------------------

    def get_valid_name(self, name: str) -> str:
        """An ASCII name qproxy accepts as a key (``Résumé 2026.pdf`` -> ``Resume_2026.pdf``)."""
        ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
        cleaned = _UNSAFE.sub("_", ascii_name).strip("._") or "file"
        return cleaned[:200]

    def get_available_name(self, name: str, max_length: int | None = None) -> str:
        # Django's loop asks exists() until a name is free; exists() looks at Redis, the
        # local disk and S3, so a name is never reused while any copy or record remains.
        return super().get_available_name(self._key(name), max_length=max_length)

    def _key(self, name: str) -> str:
        key = name.replace("\\", "/").lstrip("/")
        try:
            return validate_key(key)
        except InvalidKey:
            parts = [self.get_valid_name(p) for p in key.split("/") if p.strip(".")]
            return validate_key("/".join(parts)[:MAX_KEY_BYTES] or "file")

    # -- the Storage API ------------------------------------------------------------------

    def _save(self, name: str, content: File[Any]) -> str:
        key = self._key(name)
        if hasattr(content, "seek") and getattr(content, "seekable", lambda: True)():
            content.seek(0)
        original = clean_filename(getattr(content, "name", None) or key.rsplit("/", 1)[-1])
        fields = {
            "filename": original,
            "content_type": clean_content_type(getattr(content, "content_type", None), key),
            "meta": getattr(content, META_ATTRIBUTE, {}),
        }
        files.store(self.stores, content.chunks(), key, fields, enqueue=not self.delayed)
        return key

    def _open(self, name: str, mode: str = "rb") -> File[Any]:
        if "w" in mode or "a" in mode or "+" in mode:
            raise ValueError("QueuedStorage files are read-only; save() a new file instead")
        key = self._key(name)
        stores = self.stores
        if stores.local.exists(key):
            return File(stores.local.open(key), name=key)
        return File(stores.remote.open(key), name=key)

    def _record(self, name: str) -> FileRecord | None:
        return self.stores.state.get(self._key(name))

    def exists(self, name: str) -> bool:
        key = self._key(name)
        if self.stores.state.get(key) is not None:  # deleted ones too, until every copy is gone
            return True
        return self.stores.local.exists(key) or self.stores.remote.exists(key)

    def delete(self, name: str) -> None:
        """Mark deleted at once (404 from then on); every copy is removed in the background."""
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
        if name is None:
            raise ValueError("no name")
        return self.stores.config.public_path + quote(self._key(name), safe="/")

    def path(self, name: str) -> str:
        raise NotImplementedError("QueuedStorage files may live in S3: open() them instead")

    def listdir(self, path: str) -> tuple[list[str], list[str]]:
        raise NotImplementedError("QueuedStorage cannot list directories")

    def get_created_time(self, name: str) -> datetime:
        record = self._record(name)
        if record is None:
            raise FileNotFoundError(name)
        return datetime.fromtimestamp(record.created, UTC)

    def get_modified_time(self, name: str) -> datetime:
        record = self._record(name)
        if record is None:
            raise FileNotFoundError(name)
        return datetime.fromtimestamp(record.updated or record.created, UTC)

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
