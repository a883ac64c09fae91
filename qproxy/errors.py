"""Every error qproxy raises on purpose, and the one place each maps to an HTTP status.

Backends' own exceptions (redis-py's, botocore's, OSError from the disk) are mapped into
this tree once, where each store talks to its backend (``qproxy/stores/``), with
``raise ... from exc``; above the stores only these classes are caught.

::

    QProxyError
    ├── ConfigError              500  a setting is missing or invalid
    ├── InvalidKey               400
    ├── MalformedUpload          400
    ├── IncompleteBody           400
    ├── ClientDisconnected       400  (nobody is left to read the answer)
    ├── LengthRequired           411
    ├── UploadTooLarge           413
    ├── InsufficientStorage      507
    ├── NodeDraining             503  this node is leaving (``qproxy drain``): upload elsewhere
    ├── UnsafePath               500  a symlink planted under the local root
    ├── StateUnavailable         503  Redis
    ├── RemoteError              502  S3
    │   ├── OriginUnreachable         the web node holding a file does not answer
    │   └── VerificationFailed
    ├── LeaseLost                409  a compare-and-set found the record moved on
    ├── KeyExists                409  a record for the key is already there
    └── TransferRetry            503  this attempt failed; another follows
"""

from __future__ import annotations


class QProxyError(Exception):
    """Base of every qproxy error. ``status`` is the HTTP answer it turns into."""

    status: int = 500

    @property
    def reason(self) -> str:
        """A one-line reason, safe to send to a client."""
        text = str(self) or type(self).__name__
        return " ".join(text.split())


class ConfigError(QProxyError):
    """A setting is missing or has an invalid value."""


class InvalidKey(QProxyError):
    """A storage key failed validation (bad characters, ``..``, too long, ...)."""

    status = 400


class MalformedUpload(QProxyError):
    """The request body is not valid multipart/form-data."""

    status = 400


class IncompleteBody(QProxyError):
    """The client stopped sending before the end of the body it declared."""

    status = 400


class ClientDisconnected(QProxyError):
    """The client went away before the whole body arrived."""

    status = 400


class LengthRequired(QProxyError):
    """The body has neither a Content-Length nor a framing the server terminated."""

    status = 411


class UploadTooLarge(QProxyError):
    """The body, a part or the form fields exceed a configured limit."""

    status = 413


class InsufficientStorage(QProxyError):
    """The local disk is full."""

    status = 507


class NodeDraining(QProxyError):
    """This web node is being drained (``qproxy drain``): it takes no new uploads."""

    status = 503
    retry_after = 30


class UnsafePath(QProxyError):
    """A symlink (or a file) stands where the local store expects a folder or a file of its
    own: refused, never followed."""


class StateUnavailable(QProxyError):
    """Redis could not be reached."""

    status = 503


class RemoteError(QProxyError):
    """S3 refused or failed an operation."""

    status = 502


class OriginUnreachable(RemoteError):
    """The web node holding a file's only copy does not answer (down, hung, cut off, or
    answering 5xx): waiting heals it, so a transfer keeps retrying."""


class VerificationFailed(RemoteError):
    """The object in S3 does not match the local file (size or checksum)."""


class LeaseLost(QProxyError):
    """A transfer lost its lease: another run or a newer upload owns the record now."""

    status = 409


class KeyExists(QProxyError):
    """A record for the key already exists (and was not to be replaced)."""

    status = 409


class TransferRetry(QProxyError):
    """This transfer attempt failed (``cause``); the record is back in ``queued``."""

    status = 503

    def __init__(self, cause: Exception) -> None:
        super().__init__(str(cause))
        self.cause = cause
