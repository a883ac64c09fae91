"""qproxy: accept big uploads at local-disk speed, serve them from S3.

Wrap an app with :class:`qproxy.wsgi.UploadMiddleware`; run ``qproxy worker`` and
``qproxy resolver``; put nginx in front (``qproxy nginx-config``).
"""

from qproxy.config import Config
from qproxy.errors import (
    ConfigError,
    InsufficientStorage,
    InvalidKey,
    LeaseLost,
    LengthRequired,
    MalformedUpload,
    QProxyError,
    RemoteError,
    StateUnavailable,
    UploadTooLarge,
    VerificationFailed,
)
from qproxy.node import StoredFile

__version__ = "0.1.0"

__all__ = [
    "Config",
    "ConfigError",
    "InsufficientStorage",
    "InvalidKey",
    "LeaseLost",
    "LengthRequired",
    "MalformedUpload",
    "QProxyError",
    "RemoteError",
    "StateUnavailable",
    "StoredFile",
    "UploadTooLarge",
    "VerificationFailed",
    "__version__",
]
