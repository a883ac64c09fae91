"""Every error qproxy raises on purpose, and the one place each maps to an HTTP status."""

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


class LengthRequired(QProxyError):
    """The body has neither a Content-Length nor a framing the server terminated."""

    status = 411


class UploadTooLarge(QProxyError):
    """The body, a part or the form fields exceed a configured limit."""

    status = 413


class InsufficientStorage(QProxyError):
    """The local disk is full."""

    status = 507


class StateUnavailable(QProxyError):
    """Redis could not be reached."""

    status = 503


class RemoteError(QProxyError):
    """S3 refused or failed an operation."""

    status = 502


class VerificationFailed(RemoteError):
    """The object in S3 does not match the local file (size or checksum)."""


class LeaseLost(QProxyError):
    """A transfer lost its lease: another run or a newer upload owns the record now."""

    status = 409
