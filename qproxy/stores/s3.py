"""S3: put with checksums, verify, delete, list, and the URLs clients are sent to.

botocore's errors become :class:`qproxy.errors.RemoteError` in one place
(:func:`s3_errors`); nothing above this module sees a botocore exception.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import quote

import boto3
import botocore.config
import botocore.exceptions

from qproxy import metrics
from qproxy.config import Config
from qproxy.errors import ConfigError, RemoteError, VerificationFailed

if TYPE_CHECKING:
    from botocore.config import _S3Dict
    from mypy_boto3_s3.client import S3Client
    from mypy_boto3_s3.type_defs import CompletedPartTypeDef

ClientError = (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError)
_NOT_FOUND = ("404", "NoSuchKey", "NotFound")
# How long a presigned URL for a private file lives (at most QPROXY_PRESIGN_EXPIRES).
PRIVATE_URL_SECONDS = 60


@contextlib.contextmanager
def s3_errors(what: str) -> Iterator[None]:
    """The one place botocore's errors become :class:`RemoteError` (``what`` failed)."""
    try:
        yield
    except ClientError as exc:
        # (botocore's own errors, a timeout among them, have no response, or a None one)
        code = (getattr(exc, "response", None) or {}).get("Error", {}).get("Code")
        if code not in _NOT_FOUND:  # (a missing object is an answer, not an error)
            metrics.s3_error(what.split()[0])
        raise RemoteError(f"S3 {what} failed: {exc}") from exc


def _not_found(exc: RemoteError) -> bool:
    cause = exc.__cause__
    return isinstance(cause, botocore.exceptions.ClientError) and (
        cause.response.get("Error", {}).get("Code") in _NOT_FOUND
    )


@dataclass(frozen=True, slots=True)
class RemoteObject:
    """What S3 says about one object (a HEAD, or a listing entry and its HEAD)."""

    key: str  # the qproxy key (without the prefix)
    size: int
    sha256: str = ""  # the hex SHA-256 qproxy stored as metadata
    content_type: str = "application/octet-stream"


@dataclass(frozen=True, slots=True)
class PartialUpload:
    """An S3 multipart upload never completed."""

    object_key: str
    upload_id: str
    started: float
    name: str  # the object's name without the prefix (what FileRecord.object is)


def make_client(config: Config, *, timeout: float | None = None) -> S3Client:
    """A boto3 client for ``config``'s endpoint. With ``timeout``, every request gets that
    long to connect and to answer, and one attempt (for callers that must not hang)."""
    # Standard retries (legacy is the default) and checksums only when required: we send
    # our own SHA-256 per request, and some S3-compatible servers reject botocore's CRC32.
    # No SHA-256 of the body for the signature either: S3 checks the x-amz-checksum-sha256
    # of every put and part, which botocore already trusts over https; on plain http it
    # would hash every byte a second time (measured: ~15% of a 256 MiB transfer's time).
    s3: _S3Dict = {"payload_signing_enabled": False}
    if config.s3_endpoint_url:
        s3["addressing_style"] = "path"
    boto_config = botocore.config.Config(
        signature_version="s3v4",
        retries={"mode": "standard", "max_attempts": 3 if timeout is None else 1},
        connect_timeout=5 if timeout is None else timeout,
        read_timeout=60 if timeout is None else timeout,
        max_pool_connections=max(10, config.transfer_concurrency * 2),
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        s3=s3,
    )
    client = boto3.session.Session().client(
        "s3",
        endpoint_url=config.s3_endpoint_url,
        region_name=config.s3_region,
        config=boto_config,
    )
    client.meta.events.register("before-send.s3.PutObject", _send_at_once)
    return client


def _send_at_once(request: Any, **_: Any) -> None:
    """A single PUT (a file below the multipart threshold, its bytes in memory) sends its
    body with its headers. botocore turns every PutObject body into a file and asks the
    server with ``Expect: 100-continue`` to say "go on" first: one round trip more per
    small file, before any byte of it moves. (Expect is not signed: dropping it here, after
    signing, is safe.) The parts of a multipart upload keep botocore's way."""
    request.headers.pop("Expect", None)


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


class RemoteStore:
    """One bucket (and prefix) in S3."""

    def __init__(
        self, config: Config, client: S3Client | None = None, *, timeout: float | None = None
    ) -> None:
        if not config.s3_bucket:
            raise ConfigError("QPROXY_S3_BUCKET is not set")
        self.config = config
        self.bucket = config.s3_bucket
        self.prefix = config.s3_prefix
        self._client = client
        self._timeout = timeout
        self._lock = threading.Lock()
        self._signed: dict[tuple[str, str, str, str, int], tuple[str, float]] = {}

    @property
    def client(self) -> S3Client:
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._client = make_client(self.config, timeout=self._timeout)
        return self._client

    def object_key(self, key: str) -> str:
        return self.prefix + key

    def put(
        self,
        key: str,
        fh: IO[bytes],
        *,
        size: int,
        sha256: str,
        content_type: str,
        content_disposition: str = "",
    ) -> tuple[str, bool]:
        """Upload ``fh`` (positioned at 0) with SHA-256 checksums S3 verifies on arrival.

        Returns the checksum S3 should report for the object (the file's SHA-256 for a
        single PUT; for a multipart upload the SHA-256 of the parts' SHA-256s, base64), and
        whether S3's answer already confirmed it.
        """
        extra: dict[str, Any] = {
            "ContentType": content_type,
            "Metadata": {"sha256": sha256},
        }
        if content_disposition:
            extra["ContentDisposition"] = content_disposition
        with s3_errors(f"put of {key}"):
            if size < self.config.multipart_threshold:
                checksum = _b64(bytes.fromhex(sha256))
                # Read whole (at most the threshold in memory, less than a multipart
                # upload's parts in flight) and sent without waiting for a "100 Continue"
                # (_send_at_once).
                body = fh.read(size + 1)
                if len(body) != size:
                    raise VerificationFailed(
                        f"{key}: the copy to send is {len(body)}"
                        f"{'+' if len(body) > size else ''} bytes, its record says {size}"
                    )
                answer = self.client.put_object(
                    Bucket=self.bucket,
                    Key=self.object_key(key),
                    Body=body,
                    ContentLength=size,
                    ChecksumAlgorithm="SHA256",
                    ChecksumSHA256=checksum,
                    **extra,
                )
                return checksum, answer.get("ChecksumSHA256") == checksum
            return self._put_multipart(key, fh, extra), False

    def store(
        self,
        key: str,
        fh: IO[bytes],
        *,
        size: int,
        sha256: str,
        content_type: str,
        content_disposition: str = "",
    ) -> None:
        """:meth:`put`, then :meth:`verify` - unless S3's answer to a single PUT already
        vouches for the bytes: S3 checked the SHA-256 we sent and reports the checksum it
        computed over what it stored (equal bytes, so equal size too). A store that does
        not report it gets the HEAD. Saves one request per small file (make bench,
        "transfer 1,000 files")."""
        checksum, confirmed = self.put(
            key,
            fh,
            size=size,
            sha256=sha256,
            content_type=content_type,
            content_disposition=content_disposition,
        )
        if not confirmed:
            self.verify(key, size=size, sha256=sha256, checksum=checksum)

    def _put_multipart(self, key: str, fh: IO[bytes], extra: dict[str, Any]) -> str:
        okey = self.object_key(key)
        # An upload of this object still open is a dead run's: each version has its own
        # object, and the lease makes this run the only live one sending it. Aborted now,
        # not after QPROXY_MULTIPART_MAX_AGE (the sweep leaves a live run's object alone).
        self._abort_open(okey)
        upload = self.client.create_multipart_upload(
            Bucket=self.bucket, Key=okey, ChecksumAlgorithm="SHA256", **extra
        )
        upload_id = upload["UploadId"]
        parts: list[CompletedPartTypeDef] = []
        try:
            width = max(1, self.config.transfer_concurrency)
            with ThreadPoolExecutor(width, thread_name_prefix="qproxy-part") as pool:
                # At most ``width`` parts in memory: read the next only when one finished.
                inflight: deque[Future[CompletedPartTypeDef]] = deque()
                number = 0
                while True:
                    chunk = fh.read(self.config.multipart_chunk)
                    if not chunk:
                        break
                    number += 1
                    inflight.append(pool.submit(self._put_part, okey, upload_id, number, chunk))
                    del chunk
                    if len(inflight) >= width:
                        parts.append(inflight.popleft().result())
                while inflight:
                    parts.append(inflight.popleft().result())
            self.client.complete_multipart_upload(
                Bucket=self.bucket,
                Key=okey,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
            )
        except BaseException:
            # If this fails too, the lifecycle rule (deploy/) aborts what is left.
            with contextlib.suppress(*ClientError):
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=okey, UploadId=upload_id)
            raise
        combined = hashlib.sha256(b"".join(base64.b64decode(p["ChecksumSHA256"]) for p in parts))
        return _b64(combined.digest())

    def _put_part(
        self, okey: str, upload_id: str, number: int, chunk: bytes
    ) -> CompletedPartTypeDef:
        checksum = _b64(hashlib.sha256(chunk).digest())
        answer = self.client.upload_part(
            Bucket=self.bucket,
            Key=okey,
            UploadId=upload_id,
            PartNumber=number,
            Body=chunk,
            ChecksumAlgorithm="SHA256",
            ChecksumSHA256=checksum,
        )
        return {"PartNumber": number, "ETag": answer["ETag"], "ChecksumSHA256": checksum}

    def verify(self, key: str, *, size: int, sha256: str, checksum: str = "") -> None:
        """Raise :class:`VerificationFailed` unless S3 holds exactly ``size`` bytes of ``sha256``.

        ``checksum`` is what :meth:`put` returned; S3 reports it (a multipart one with a
        ``-N`` part count appended).
        """
        with s3_errors(f"head of {key}"):
            head = self.client.head_object(
                Bucket=self.bucket, Key=self.object_key(key), ChecksumMode="ENABLED"
            )
        if head["ContentLength"] != size:
            raise VerificationFailed(
                f"{key}: S3 has {head['ContentLength']} bytes, expected {size}"
            )
        stored = head.get("Metadata", {}).get("sha256")
        if stored != sha256:
            raise VerificationFailed(f"{key}: S3 sha256 metadata {stored!r} != {sha256}")
        reported = head.get("ChecksumSHA256", "")
        expected = checksum or _b64(bytes.fromhex(sha256))
        if not reported:
            # Without S3's own checksum only the metadata we wrote would vouch for the bytes.
            raise VerificationFailed(f"{key}: S3 reports no SHA-256 checksum for the object")
        if reported.split("-", 1)[0] != expected:
            raise VerificationFailed(f"{key}: S3 checksum {reported} does not match {expected}")

    def exists(self, key: str) -> bool:
        return self.head(key) is not None

    def head(self, key: str) -> RemoteObject | None:
        """What S3 holds under ``key``, or None."""
        try:
            with s3_errors(f"head of {key}"):
                head = self.client.head_object(Bucket=self.bucket, Key=self.object_key(key))
        except RemoteError as exc:
            if _not_found(exc):
                return None
            raise
        return RemoteObject(
            key=key,
            size=head["ContentLength"],
            sha256=head.get("Metadata", {}).get("sha256", ""),
            content_type=head.get("ContentType", "application/octet-stream"),
        )

    def list_keys(self) -> Iterator[str]:
        """Every object under the prefix, as qproxy keys (without the prefix)."""
        paginator = self.client.get_paginator("list_objects_v2")
        with s3_errors("listing"):
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix):
                for obj in page.get("Contents", []):
                    yield obj["Key"][len(self.prefix) :]

    def open(self, key: str) -> IO[bytes]:
        """A stream of the object's bytes (FileNotFoundError if there is no such object)."""
        try:
            with s3_errors(f"get of {key}"):
                answer = self.client.get_object(Bucket=self.bucket, Key=self.object_key(key))
        except RemoteError as exc:
            if _not_found(exc):
                raise FileNotFoundError(key) from exc
            raise
        return io.BufferedReader(_Body(answer["Body"]), 1024 * 1024)

    def delete(self, key: str) -> None:
        """The object, and any upload of it still open: a run whose record was deleted
        meanwhile, or a CreateMultipartUpload botocore sent again while S3 stalled (seen:
        two uploads made, one completed, the other left with its parts for good)."""
        okey = self.object_key(key)
        with s3_errors(f"delete of {key}"):
            self.client.delete_object(Bucket=self.bucket, Key=okey)
            self._abort_open(okey)

    def _abort_open(self, okey: str) -> None:
        """Abort every multipart upload of object ``okey`` still open."""
        answer = self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=okey)
        for upload in answer.get("Uploads", []):
            if upload["Key"] != okey:
                continue
            try:
                self.client.abort_multipart_upload(
                    Bucket=self.bucket, Key=okey, UploadId=upload["UploadId"]
                )
            except botocore.exceptions.ClientError as exc:
                # NoSuchUpload: aborted meanwhile (by the sweep), which is what was wanted.
                if exc.response.get("Error", {}).get("Code") != "NoSuchUpload":
                    raise

    def partial_uploads(self) -> list[PartialUpload]:
        """Multipart uploads under the prefix that were started and never completed."""
        with s3_errors("listing of multipart uploads"):
            answer = self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=self.prefix)
        return [
            PartialUpload(
                u["Key"], u["UploadId"], u["Initiated"].timestamp(), u["Key"][len(self.prefix) :]
            )
            for u in answer.get("Uploads", [])
        ]

    def abort(self, upload: PartialUpload) -> None:
        with s3_errors(f"abort of {upload.object_key}"):
            self.client.abort_multipart_upload(
                Bucket=self.bucket, Key=upload.object_key, UploadId=upload.upload_id
            )

    def url(
        self,
        key: str,
        *,
        method: str = "GET",
        content_type: str = "",
        disposition: str = "",
        private: bool = False,
    ) -> str:
        """Where to send a client: a presigned URL, or the public base + key.

        A presigned URL signs its method, so HEAD needs its own. It also names the
        Content-Type and Content-Disposition S3 answers with (``response-content-*``), so
        the file is shown as the resolver decided, whatever the object was stored with.
        """
        # A private file never goes out by a public URL, and its presigned one is short.
        if self.config.redirect == "public" and not private:
            base = (self.config.remote_base_url or "").rstrip("/")
            return f"{base}/{quote(self.object_key(key), safe='/')}"
        operation = "head_object" if method == "HEAD" else "get_object"
        # Signing costs ~100 us of CPU; a URL signed a moment ago is as good (it lives for
        # presign_expires, redirects are cached for at most half of it), so reuse it for
        # a tenth of its life.
        now = time.monotonic()
        expires = (
            min(self.config.presign_expires, PRIVATE_URL_SECONDS)
            if private
            else (self.config.presign_expires)
        )
        cache_key = (key, operation, content_type, disposition, expires)
        cached = self._signed.get(cache_key)
        if cached is not None and cached[1] > now:
            return cached[0]
        params = {"Bucket": self.bucket, "Key": self.object_key(key)}
        if content_type:
            params["ResponseContentType"] = content_type
        if disposition:
            params["ResponseContentDisposition"] = disposition
        with s3_errors(f"signing of {key}"):
            url = self.client.generate_presigned_url(operation, Params=params, ExpiresIn=expires)
        if len(self._signed) >= 50_000:
            self._signed.clear()
        self._signed[cache_key] = (url, now + expires / 10)
        return url

    def ensure_bucket(self) -> None:
        if self.ping():
            return
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        if self.config.s3_region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.config.s3_region}
        with s3_errors(f"creation of bucket {self.bucket}"):
            self.client.create_bucket(**kwargs)

    def ping(self) -> bool:
        try:
            with s3_errors(f"head of bucket {self.bucket}"):
                self.client.head_bucket(Bucket=self.bucket)
        except RemoteError:
            return False
        return True


class _Body(io.RawIOBase):
    """botocore's streaming body as a raw file (read through a buffer)."""

    def __init__(self, body: Any) -> None:
        self._body = body

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        with s3_errors("read"):
            data = self._body.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._body.close()
        super().close()
