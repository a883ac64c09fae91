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
    # The resolver remembers records until Redis says they changed (client tracking); off:
    # a change is then seen by the very next request, on: within Redis's invalidation delay
    record_cache: bool = False
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
    # where this node's processes keep their metrics (empty: a folder in the temp directory
    # named after the local root)
    metrics_dir: str = ""
    log_format: str = "text"  # or "json": one JSON object a line
    on_transferred: str = ""  # dotted path of a callable(record: dict), run in the worker
    on_failed: str = ""

    def __post_init__(self) -> None:
        _check_values(self)
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
        if self.log_format not in ("text", "json"):
            raise ConfigError(
                f"QPROXY_LOG_FORMAT must be 'text' or 'json', got {self.log_format!r}"
            )
        if self.redirect == "public" and not self.remote_base_url:
            raise ConfigError("QPROXY_REDIRECT=public needs QPROXY_REMOTE_BASE_URL")
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

# -- checks: each bad value is one line naming the variable, what is wrong, an example -----

_REDIS_SCHEMES = ("redis", "rediss", "unix", "redis+sentinel")
# Celery's brokers that qproxy is run with (kombu knows more; these are the ones checked).
_BROKER_SCHEMES = (*_REDIS_SCHEMES, "amqp", "amqps", "pyamqp", "sqs", "sentinel")
_HTTP = ("http", "https")
# (setting, smallest value, whether the smallest is allowed, example)
_NUMBERS: tuple[tuple[str, float, bool, str], ...] = (
    ("max_upload_bytes", 0, False, "10737418240"),
    ("max_parts", 1, True, "100"),
    ("max_form_memory", 0, True, "1048576"),
    ("presign_expires", 1, True, "3600"),
    ("multipart_threshold", 5 * MiB, True, str(16 * MiB)),
    ("multipart_chunk", 5 * MiB, True, str(8 * MiB)),  # S3's smallest part
    ("transfer_concurrency", 1, True, "4"),
    ("transfer_retries", 0, True, "8"),
    ("retry_backoff", 0, True, "2"),
    ("retry_backoff_max", 0, True, "600"),
    ("lease_seconds", 0, False, "900"),
    ("visibility_timeout", 0, False, "3600"),
    ("janitor_interval", 0, False, "10"),
    ("sweep_interval", 0, False, "60"),
    ("stuck_seconds", 0, False, "600"),
    ("failed_retry_seconds", 0, False, "3600"),
    ("pending_max_age", 0, False, "3600"),
    ("multipart_max_age", 0, False, "86400"),
    ("drop_grace_seconds", 0, True, "5"),
    ("keep_local_seconds", 0, True, "3600"),
    ("tus_expire_seconds", 0, False, "86400"),
)


def _var(name: str) -> str:
    return "QPROXY_" + name.upper()


def shown_url(url: str) -> str:
    """``url`` with its password masked (for messages and logs)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    credentials, at, hosts = rest.rpartition("@")
    if not at:
        return url
    user, colon, _ = credentials.partition(":")
    return f"{scheme}://{user}{':***' if colon else ''}@{hosts}"


def _check_url(name: str, url: str, schemes: tuple[str, ...], example: str) -> None:
    var, shown = _var(name), shown_url(url)
    wanted = " or ".join(f"{s}://" for s in schemes)
    if "://" not in url:
        raise ConfigError(f"{var}={shown}: no scheme; write {wanted}... (e.g. {example})")
    parts = urlsplit(url)
    if parts.scheme not in schemes:
        raise ConfigError(
            f"{var}={shown}: unknown scheme {parts.scheme!r}; use {wanted} (e.g. {example})"
        )
    if parts.scheme in ("unix", "redis+sentinel", "sentinel", "sqs"):
        if parts.scheme == "redis+sentinel":
            from qproxy.redis_url import parse_sentinel

            parse_sentinel(url, variable=var)
        elif parts.scheme == "unix" and not parts.path:
            raise ConfigError(f"{var}={shown}: no socket path (e.g. unix:///run/redis.sock)")
        return
    if not parts.hostname:
        raise ConfigError(f"{var}={shown}: no host (e.g. {example})")
    try:
        port = parts.port
    except ValueError:
        port = -1
    if port is not None and not 0 < port < 65536:
        raise ConfigError(
            f"{var}={shown}: the port is not a number from 1 to 65535 (e.g. {example})"
        )
    if parts.scheme in ("redis", "rediss"):
        db = parts.path.strip("/")
        if db and not db.isdigit():
            raise ConfigError(
                f"{var}={shown}: the database {db!r} is not a number (e.g. {example})"
            )


def _check_values(config: Config) -> None:
    _check_url("redis_url", config.redis_url, _REDIS_SCHEMES, "redis://127.0.0.1:6379/0")
    if config.broker_url:
        _check_url("broker_url", config.broker_url, _BROKER_SCHEMES, "redis://127.0.0.1:6379/1")
    _check_url("node_url", config.node_url, _HTTP, "http://10.0.0.21:8300")
    for name in ("s3_endpoint_url", "remote_base_url", "node_tus_url"):
        value = getattr(config, name)
        if value:
            _check_url(name, value, _HTTP, "https://s3.example.com")
    for name, least, inclusive, example in _NUMBERS:
        value = getattr(config, name)
        if value < least or (value == least and not inclusive):
            shown = int(least) if float(least).is_integer() else least
            bound = f"at least {shown}" if inclusive else f"more than {shown}"
            what = "positive" if (least, inclusive) == (0, False) else bound
            raise ConfigError(f"{_var(name)}={value}: must be {what} (e.g. {_var(name)}={example})")
    if not config.local_root or not os.path.isabs(config.local_root):
        raise ConfigError(
            f"QPROXY_LOCAL_ROOT={config.local_root!r}: must be an absolute path "
            "(e.g. /var/lib/qproxy/files)"
        )
    if not config.node_id or any(c.isspace() or not c.isprintable() for c in config.node_id):
        raise ConfigError(
            f"QPROXY_NODE_ID={config.node_id!r}: must be a name without spaces (e.g. web-1)"
        )
    if not config.s3_region:
        raise ConfigError("QPROXY_S3_REGION is empty (e.g. QPROXY_S3_REGION=eu-west-1)")


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
            try:
                return int(value)
            except ValueError:
                raise ValueError(
                    f"{value!r} is not a whole number (e.g. {_example(name)})"
                ) from None
        if kind == "float":
            try:
                return float(value)
            except ValueError:
                raise ValueError(f"{value!r} is not a number (e.g. {_example(name)})") from None
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


def _example(name: str) -> str:
    default = _FIELDS[name].default
    return f"{_var(name)}={default}"
