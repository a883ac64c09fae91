"""One immutable ``Config``, built from ``QPROXY_*`` variables (and optionally a TOML file).

Everything inside qproxy takes plain values from a ``Config``; the environment is read here
and nowhere else.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from qproxy.errors import ConfigError

RedirectMode = Literal["presigned", "public"]

MiB = 1024 * 1024
GiB = 1024 * MiB

# Types a browser shows but cannot run: the only ones served inline (QPROXY_INLINE_TYPES).
DEFAULT_INLINE_TYPES = (
    "image/png",
    "image/jpeg",
    "image/gif",
    "image/webp",
    "image/avif",
    "image/bmp",
    "audio/*",
    "video/*",
    "application/pdf",
    "text/plain",
)


def _default_local_root() -> str:
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return "/var/lib/qproxy/files"
    data_home = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return os.path.join(data_home, "qproxy", "files")


@dataclass(frozen=True, kw_only=True)
class Config:
    """Settings of one qproxy node. Build with ``Config.from_env()`` or keyword arguments."""

    local_root: str = field(default_factory=_default_local_root)
    redis_url: str = "redis://127.0.0.1:6379/0"
    broker_url: str = ""  # empty: the Redis URL
    s3_bucket: str = ""
    s3_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    s3_prefix: str = ""
    public_path: str = "/media/"
    redirect: RedirectMode = "presigned"
    remote_base_url: str | None = None
    secret: str = ""
    # Lets hosts other than this one ask the resolver more than /internal/blob (nginx on
    # another host or container sends it: qproxy nginx-config adds it when it is set).
    admin_token: str = ""
    node_id: str = field(default_factory=socket.gethostname)
    node_url: str = "http://127.0.0.1:8300"
    keep_local_seconds: float = 3600.0
    max_upload_bytes: int = 10 * GiB
    max_parts: int = 100
    max_form_memory: int = MiB
    presign_expires: int = 3600
    multipart_threshold: int = 16 * MiB
    multipart_chunk: int = 8 * MiB
    transfer_concurrency: int = 4
    transfer_retries: int = 8
    retry_backoff: float = 2.0
    retry_backoff_max: float = 600.0
    lease_seconds: float = 900.0
    visibility_timeout: int = 3600
    janitor_interval: float = 10.0
    sweep_interval: float = 60.0  # cluster-wide sweep (one node at a time, under a lock)
    stuck_seconds: float = 600.0  # local/queued this long without progress: queue again
    failed_retry_seconds: float = 3600.0  # failed this long: the sweep tries once more
    pending_max_age: float = 3600.0  # temp files of requests that died, removed after this
    multipart_max_age: float = 86400.0  # incomplete S3 multipart uploads aborted after this
    drop_grace_seconds: float = 5.0
    standalone: bool = False
    raw_upload_paths: str = ""  # comma-separated globs, e.g. "/api/files/*,/upload/raw/*"
    upload_paths: str = ""  # comma-separated globs where uploads are taken; empty: every path
    private_prefixes: str = ""  # comma-separated globs over keys served only when signed
    # comma-separated types (globs: "video/*") served inline; the rest as attachments
    inline_types: str = ",".join(DEFAULT_INLINE_TYPES)
    # Resumable uploads (tus 1.0.0) at this path, e.g. "/files/" (empty: off)
    tus_path: str = ""
    # Where other web nodes reach this node's nginx, for the tus uploads it holds (empty:
    # QPROXY_NODE_URL's host on port 80)
    node_tus_url: str = ""
    tus_expire_seconds: float = 86400.0  # an incomplete tus upload is removed after this
    # comma-separated origins (or "*") whose browser clients may use the tus path
    tus_cors_origins: str = ""
    on_transferred: str = ""  # dotted path of a callable(record: dict), run in the worker
    on_failed: str = ""

    def __post_init__(self) -> None:
        if self.tus_path and (
            not self.tus_path.startswith("/")
            or not self.tus_path.endswith("/")
            or self.tus_path == self.public_path
        ):
            raise ConfigError(
                f"QPROXY_TUS_PATH must start and end with '/' and differ from "
                f"QPROXY_PUBLIC_PATH, got {self.tus_path!r} (e.g. /files/)"
            )
        if not self.public_path.startswith("/") or not self.public_path.endswith("/"):
            raise ConfigError(
                f"QPROXY_PUBLIC_PATH must start and end with '/', got {self.public_path!r}"
            )
        if self.redirect not in ("presigned", "public"):
            raise ConfigError(
                f"QPROXY_REDIRECT must be 'presigned' or 'public', got {self.redirect!r}"
            )
        if self.redirect == "public" and not self.remote_base_url:
            raise ConfigError("QPROXY_REDIRECT=public needs QPROXY_REMOTE_BASE_URL")
        if self.max_upload_bytes <= 0:
            raise ConfigError("QPROXY_MAX_UPLOAD_BYTES must be positive")
        if self.keep_local_seconds < 0:
            raise ConfigError("QPROXY_KEEP_LOCAL_SECONDS must be 0 or more")
        if self.s3_prefix and (self.s3_prefix.startswith("/") or ".." in self.s3_prefix):
            raise ConfigError("QPROXY_S3_PREFIX must be relative and must not contain '..'")
        # Backoff is capped below the broker's visibility timeout: a Celery countdown longer
        # than it makes the Redis transport redeliver the task while it still waits.
        if self.retry_backoff_max >= self.visibility_timeout:
            raise ConfigError("QPROXY_RETRY_BACKOFF_MAX must stay below QPROXY_VISIBILITY_TIMEOUT")

    @property
    def broker(self) -> str:
        return self.broker_url or self.redis_url

    @property
    def raw_paths(self) -> tuple[str, ...]:
        """Paths whose non-multipart PUT/POST bodies are stored as one file."""
        return tuple(p.strip() for p in self.raw_upload_paths.split(",") if p.strip())

    @property
    def tus_origins(self) -> tuple[str, ...]:
        return tuple(o.strip().rstrip("/") for o in self.tus_cors_origins.split(",") if o.strip())

    @property
    def tus_url(self) -> str:
        """Where other nodes send the tus requests of uploads this node holds."""
        if self.node_tus_url:
            return self.node_tus_url.rstrip("/")
        host = urlsplit(self.node_url).hostname or "127.0.0.1"
        return f"http://{f'[{host}]' if ':' in host else host}:80"

    @property
    def upload_globs(self) -> tuple[str, ...]:
        """Paths where uploads are taken (QPROXY_UPLOAD_PATHS); empty: every path."""
        return tuple(p.strip() for p in self.upload_paths.split(",") if p.strip())

    @property
    def private_globs(self) -> tuple[str, ...]:
        """Keys served only with a signed URL (QPROXY_PRIVATE_PREFIXES)."""
        return tuple(p.strip() for p in self.private_prefixes.split(",") if p.strip())

    @property
    def inline(self) -> tuple[str, ...]:
        """Content types served inline (QPROXY_INLINE_TYPES), lower case."""
        return tuple(t.strip().lower() for t in self.inline_types.split(",") if t.strip())

    @property
    def redirect_max_age(self) -> int:
        """How long a client may cache a redirect to S3: well under the presigned URL's life."""
        return max(0, min(300, self.presign_expires // 2))

    @property
    def local_path(self) -> Path:
        return Path(self.local_root)

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, *, overrides: Mapping[str, Any] | None = None
    ) -> Config:
        """Read ``QPROXY_*`` variables; ``QPROXY_CONFIG`` names a TOML file read first.

        ``overrides`` (setting names, with or without the ``QPROXY_`` prefix, any case) win
        over both: framework settings such as Django's ``QPROXY = {...}`` come in here.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        toml_path = env.get("QPROXY_CONFIG")
        if toml_path:
            try:
                with open(toml_path, "rb") as fh:
                    data = tomllib.load(fh)
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise ConfigError(f"QPROXY_CONFIG={toml_path}: {exc}") from exc
            section = data.get("qproxy", data)
            for name, value in section.items():
                if name not in _FIELDS:
                    raise ConfigError(f"{toml_path}: unknown setting {name!r}")
                values[name] = _convert(name, value)
        for name in _FIELDS:
            raw = env.get("QPROXY_" + name.upper())
            if raw is not None and raw != "":
                values[name] = _convert(name, raw)
        if overrides is None and environ is None and env.get("DJANGO_SETTINGS_MODULE"):
            # A Django project's settings.QPROXY holds in every process of it (the worker,
            # the resolver, the CLI), as in the web process (qproxy.contrib.django).
            overrides = _django_settings()
        for raw_name, value in (overrides or {}).items():
            name = raw_name.lower().removeprefix("qproxy_")
            if name not in _FIELDS:
                raise ConfigError(f"unknown qproxy setting {raw_name!r}")
            values[name] = _convert(name, value)
        return cls(**values)

    def describe(self) -> dict[str, Any]:
        """The settings as a dict, the secret masked (for ``qproxy doctor`` and logs)."""
        out = dataclasses.asdict(self)
        for name in ("secret", "admin_token"):
            if out[name]:
                out[name] = "***"
        return out


_FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def _django_settings() -> Mapping[str, Any]:
    try:
        from django.conf import settings
    except ImportError:
        return {}
    try:
        return dict(getattr(settings, "QPROXY", {}))
    except Exception as exc:  # the settings module does not import
        module = os.environ.get("DJANGO_SETTINGS_MODULE")
        raise ConfigError(f"DJANGO_SETTINGS_MODULE={module}: {exc}") from exc


def _convert(name: str, value: Any) -> Any:
    kind = _FIELDS[name].type
    try:
        if kind == "int":
            return int(value)
        if kind == "float":
            return float(value)
        if kind == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"not a boolean: {value!r}")
    except ValueError as exc:
        raise ConfigError(f"QPROXY_{name.upper()}: {exc}") from exc
    return str(value)
