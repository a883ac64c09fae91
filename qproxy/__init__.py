"""qproxy: accept big uploads at local-disk speed, serve them from S3.

Wrap an app with :class:`qproxy.wsgi.UploadMiddleware`; run ``qproxy worker`` and
``qproxy resolver``; put nginx in front (``qproxy nginx-config``).
"""

from typing import Any

from qproxy.config import Config
from qproxy.core.upload import StoredFile
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
from qproxy.headers import sign_url

__version__ = "0.1.0"


def delete(key: str, config: Config | None = None) -> bool:
    """Delete a stored file: 404 at once, every copy removed in the background.

    Returns False if there was nothing to delete.
    """
    from qproxy.compose import Stores
    from qproxy.keys import validate_key
    from qproxy.lifecycle.files import delete as delete_file

    return delete_file(Stores(config), validate_key(key))


def status(key: str, config: Config | None = None) -> dict[str, Any] | None:
    """A stored file's record as a dict (``state``: pending, local, queued, transferring,
    remote, failed or deleted; ``size``, ``sha256``, ``filename``, ``error``, ...), or None
    when there is none."""
    from qproxy.compose import Stores
    from qproxy.keys import validate_key

    record = Stores(config).state.get(validate_key(key))
    return None if record is None else record.as_dict()


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
    "delete",
    "sign_url",
    "status",
]
