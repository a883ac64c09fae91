"""Redis URLs, plain or through Sentinel.

``QPROXY_REDIS_URL`` (and ``QPROXY_BROKER_URL``) take redis-py's forms
(``redis://[:password@]host:port/db``, ``rediss://``, ``unix://``) and one for a Redis
that fails over, watched by Sentinel::

    redis+sentinel://[:password@]sentinel1:26379,sentinel2:26379,sentinel3:26379/mymaster/0

the sentinels' addresses, the master's name as the sentinels know it, and the database
number. The password is the Redis servers' (``requirepass``); sentinels that want one of
their own take ``?sentinel_password=...``. Every process asks the sentinels for the
master, and asks again when it fails over.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

from qproxy.errors import ConfigError

SCHEME = "redis+sentinel"


@dataclass(frozen=True)
class SentinelURL:
    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = None


def is_sentinel(url: str) -> bool:
    return url.startswith(SCHEME + "://")


def parse_sentinel(url: str, *, variable: str = "QPROXY_REDIS_URL") -> SentinelURL:
    parts = urlsplit(url)
    if parts.scheme != SCHEME:
        raise ConfigError(f"not a {SCHEME}:// URL: {url!r}")
    credentials, _, hosts = parts.netloc.rpartition("@")
    username, _, password = credentials.partition(":")
    sentinels: list[tuple[str, int]] = []
    for item in hosts.split(","):
        host, _, port = item.strip().rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(
                f"{variable}: sentinel address {item!r} must be HOST:PORT "
                f"(e.g. {SCHEME}://10.0.0.10:26379,10.0.0.11:26379/mymaster/0)"
            )
        sentinels.append((host.strip("[]"), int(port)))
    path = [p for p in parts.path.split("/") if p]
    if not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ConfigError(
            f"{variable}: the URL must end in /MASTER_NAME or /MASTER_NAME/DB "
            f"(e.g. {SCHEME}://10.0.0.10:26379/mymaster/0)"
        )
    query = parse_qs(parts.query)
    return SentinelURL(
        sentinels=tuple(sentinels),
        master=unquote(path[0]),
        db=int(path[1]) if len(path) == 2 else 0,
        username=unquote(username) or None,
        password=unquote(password) or None,
        sentinel_password=next(iter(query.get("sentinel_password", [])), None),
    )


def kombu_broker(url: str) -> tuple[str, dict[str, object]]:
    """The broker URL and transport options kombu takes for ``url``."""
    if not is_sentinel(url):
        return url, {}
    parsed = parse_sentinel(url)
    auth = f":{parsed.password}@" if parsed.password else ""
    hosts = ";".join(f"sentinel://{auth}{h}:{p}/{parsed.db}" for h, p in parsed.sentinels)
    options: dict[str, object] = {"master_name": parsed.master}
    if parsed.sentinel_password:
        options["sentinel_kwargs"] = {"password": parsed.sentinel_password}
    return hosts, options
