"""The names users import are pinned: changing them is a breaking change."""

from __future__ import annotations

import dataclasses
import inspect

import qproxy
from qproxy.config import Config
from qproxy.core.upload import StoredFile
from qproxy.wsgi import UploadMiddleware


def test_exported_names() -> None:
    assert sorted(qproxy.__all__) == [
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


def test_middleware_signature() -> None:
    params = inspect.signature(UploadMiddleware).parameters
    assert list(params)[:2] == ["app", "config"]
    assert params["config"].default is None


def test_upload_record_fields() -> None:
    names = [f.name for f in dataclasses.fields(StoredFile)]
    assert names[:7] == ["field", "key", "filename", "content_type", "size", "sha256", "url"]


def test_error_statuses() -> None:
    assert qproxy.MalformedUpload.status == 400
    assert qproxy.UploadTooLarge.status == 413
    assert qproxy.InsufficientStorage.status == 507
    assert issubclass(qproxy.VerificationFailed, qproxy.RemoteError)
    assert all(
        issubclass(getattr(qproxy, n), qproxy.QProxyError)
        for n in qproxy.__all__
        if n.endswith(
            (
                "Error",
                "Key",
                "Upload",
                "Large",
                "Storage",
                "Lost",
                "Required",
                "Unavailable",
                "Failed",
            )
        )
    )


def test_config_from_env_is_the_default() -> None:
    assert inspect.signature(Config.from_env).parameters["environ"].default is None
