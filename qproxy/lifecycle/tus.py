"""Resumable uploads (tus 1.0.0) into the same pipeline as any upload.

The drivers parse a request with :func:`qproxy.core.tus.parse` and call this service:
:meth:`Tus.create` after the app accepted the creation, :meth:`Tus.append` for each PATCH
(the bytes land in the node's local store, fsynced before the new offset is answered), and
:meth:`Tus.finish` once the last byte is in: the upload becomes an :class:`Intake` of one
file, handed to the app as a raw-body upload is, and committed (journal, record, transfer)
as the app's answer decides. State lives on the node (:mod:`qproxy.stores.partial`), not
in Redis; the sweep removes expired uploads.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Iterable

from qproxy.compose import Stores
from qproxy.core import tus
from qproxy.core.tus import TusCall, TusRefusal, Upload
from qproxy.core.upload import Answer
from qproxy.errors import UploadTooLarge as TooLarge
from qproxy.lifecycle.ingest import Intake
from qproxy.stores.local import LocalStore
from qproxy.stores.partial import ChecksumMismatch, OffsetMismatch, Partials

log = logging.getLogger("qproxy")


class Tus:
    """The tus uploads of one node."""

    def __init__(self, stores: Stores) -> None:
        self.stores = stores
        self.config = stores.config
        self.partials = Partials(LocalStore(self.config.local_path, node_id=self.config.node_id))
        self.max_size = self.config.max_upload_bytes

    def location(self, upload_id: str) -> str:
        return self.config.tus_path + upload_id

    def create(self, call: TusCall) -> Upload:
        node = tus.node_tag(self.config.node_id)
        upload = Upload(
            upload_id=f"{node}.{secrets.token_urlsafe(18)}",
            length=call.length,
            metadata=call.metadata,
            expires=time.time() + self.config.tus_expire_seconds,
            concat=call.concat,
        )
        self.partials.create(upload.upload_id, self._state(upload))
        return upload

    def create_final(self, call: TusCall) -> Upload:
        """Concatenation: a final upload made of complete partial ones, in order (complete
        at once; the partial ones go once it is taken)."""
        here = tus.node_tag(self.config.node_id)
        for part_id in call.parts:
            if part_id.partition(".")[0] != here:
                raise TusRefusal(
                    400,
                    f"the partial upload {part_id} is held by another node: the parts of one "
                    "concatenation must all be uploaded through one node",
                )
        parts = [self.get(part) for part in call.parts]
        for part in parts:
            if not part.is_partial or not part.complete:
                raise TusRefusal(400, f"{part.upload_id} is not a complete partial upload")
        length = sum(part.offset for part in parts)
        if length > self.max_size:
            raise TusRefusal(413, f"the parts add up to over {self.max_size} bytes")
        node = tus.node_tag(self.config.node_id)
        upload = Upload(
            upload_id=f"{node}.{secrets.token_urlsafe(18)}",
            length=length,
            metadata=call.metadata,
            expires=time.time() + self.config.tus_expire_seconds,
            concat="final",
            parts=call.parts,
        )
        upload.offset = self.partials.concatenate(
            upload.upload_id, list(call.parts), self._state(upload)
        )
        return upload

    def _state(self, upload: Upload) -> dict[str, object]:
        return {
            "length": upload.length,
            "metadata": upload.metadata,
            "expires": upload.expires,
            "node": self.config.node_id,
            "concat": upload.concat,
            "parts": list(upload.parts),
        }

    def get(self, upload_id: str) -> Upload:
        found = self.partials.load(upload_id)
        if found is None:
            raise TusRefusal(404, "no such upload")
        state, size = found
        upload = Upload(
            upload_id=upload_id,
            length=state.get("length"),
            offset=size,
            metadata=str(state.get("metadata", "")),
            expires=float(state.get("expires", 0.0)),
            concat=str(state.get("concat", "")),
            parts=tuple(state.get("parts", ())),
        )
        if upload.expires and upload.expires < time.time():
            self.partials.remove(upload_id)
            raise TusRefusal(410, "the upload expired")
        return upload

    def append(self, upload: Upload, call: TusCall, chunks: Iterable[bytes]) -> Upload:
        """Append a PATCH's (or a creation's) body; the upload as it is afterwards."""
        new_length = tus.check_patch(call, upload, max_size=self.max_size)
        if new_length is not None:
            upload.length = new_length
            self.partials.save(upload.upload_id, self._state(upload))
        checksum = (call.checksum.algorithm, call.checksum.digest) if call.checksum else None
        try:
            upload.offset = self.partials.append(
                upload.upload_id,
                upload.offset,
                chunks,
                limit=tus.room(upload, max_size=self.max_size),
                checksum=checksum,
            )
        except ChecksumMismatch as exc:
            raise TusRefusal(tus.CHECKSUM_MISMATCH, exc.reason) from exc
        except OffsetMismatch as exc:
            raise TusRefusal(409, exc.reason) from exc
        except TooLarge as exc:
            raise TusRefusal(413, exc.reason) from exc
        except FileNotFoundError as exc:
            raise TusRefusal(404, "no such upload") from exc
        return upload

    def finish(self, upload: Upload) -> Intake:
        """The complete upload as an intake of one file, for the app to accept or refuse."""
        meta = tus.parse_metadata(upload.metadata)
        filename = meta.get("filename") or meta.get("name") or "upload.bin"
        content_type = meta.get("filetype") or meta.get("type") or "application/octet-stream"
        temp = self.partials.take(upload.upload_id, max_size=self.max_size)
        for part in upload.parts:  # a final upload's partial ones: their bytes are in it
            self.partials.remove(part)
        return Intake.of_file(self.stores, temp, filename=filename, content_type=content_type)

    def not_taken(self, upload: Upload, status: int) -> Answer:
        """The app answered ``status`` (< 400) without taking the upload: say so."""
        log.warning(
            "tus: upload %s not kept: the app answered %d without reading qproxy.uploads",
            upload.upload_id,
            status,
        )
        return tus.not_taken_answer(status)

    def parts_shown(self, upload: Upload) -> Upload:
        """The upload as HEAD shows it (its parts by their URLs)."""
        if upload.parts:
            upload.parts = tuple(self.location(p) for p in upload.parts)
        return upload

    def terminate(self, upload_id: str) -> None:
        if not self.partials.remove(upload_id):
            raise TusRefusal(404, "no such upload")

    def remove_expired(self, *, now: float | None = None) -> int:
        """Remove incomplete uploads past their expiry (the sweep calls this)."""
        now = time.time() if now is None else now
        removed = 0
        for upload_id in list(self.partials.ids()):
            found = self.partials.load(upload_id)
            if found is None:
                continue
            expires = float(found[0].get("expires", 0.0))
            if expires and expires < now and self.partials.remove(upload_id):
                removed += 1
        return removed
