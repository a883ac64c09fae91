"""Response header values built from untrusted metadata (filenames), safely."""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from urllib.parse import parse_qsl, quote

from qproxy.config import Config
from qproxy.errors import ConfigError
from qproxy.keys import validate_key

_UNSAFE_ASCII = re.compile(r"[^A-Za-z0-9 !#$&+\-.^_`|~()\[\]{}@,=]")


def content_disposition(filename: str, *, disposition: str = "inline") -> str:
    """``inline; filename="..."; filename*=UTF-8''...`` (RFC 6266), no way to inject a header."""
    if not filename:
        return disposition
    ascii_name = _UNSAFE_ASCII.sub("_", filename.encode("ascii", "replace").decode())[:150]
    encoded = quote(filename, safe="")
    return f"{disposition}; filename=\"{ascii_name}\"; filename*=UTF-8''{encoded}"


def sign(secret: str, key: str, expires: int, *, scope: str = "") -> str:
    """HMAC over a key, an expiry and what the URL is for (``scope``: a blob's version)."""
    message = f"{key}\n{expires}" + (f"\n{scope}" if scope else "")
    return hmac.new(secret.encode(), message.encode(), hashlib.sha256).hexdigest()


def signed_query(secret: str, key: str, ttl: int = 300, *, version: int = 1) -> str:
    """The query of an internal blob URL: valid for ``ttl`` seconds, for this version only
    (a newer upload under the key, or a delete, revokes it)."""
    expires = int(time.time()) + ttl
    return f"exp={expires}&v={version}&sig={sign(secret, key, expires, scope=f'v{version}')}"


def check_signature(
    secret: str, key: str, expires: str, signature: str, *, scope: str = ""
) -> bool:
    if not secret:
        return False
    try:
        exp = int(expires)
    except ValueError:
        return False
    if exp < time.time():
        return False
    return hmac.compare_digest(sign(secret, key, exp, scope=scope), signature)


def file_query(secret: str, key: str, expires: int, *, method: str = "GET") -> str:
    """The query that lets one method reach a private file until ``expires``."""
    return f"exp={expires}&sig={sign(secret, key, expires, scope='file ' + method.upper())}"


def sign_url(
    key: str, expires_in: int = 300, *, method: str = "GET", config: Config | None = None
) -> str:
    """A URL (path and query) that serves ``key`` to ``method`` for ``expires_in`` seconds:
    the only way a private file is served (QPROXY_PRIVATE_PREFIXES, or an upload the app
    marked ``private``). The signature binds the key, the expiry and the method."""
    cfg = config or Config.from_env()
    if not cfg.secret:
        raise ConfigError("QPROXY_SECRET is not set: signed URLs need it")
    if expires_in <= 0:
        raise ConfigError("expires_in must be positive")
    validate_key(key)
    expires = int(time.time()) + int(expires_in)
    query = file_query(cfg.secret, key, expires, method=method)
    return f"{cfg.public_path}{quote(key, safe='/')}?{query}"


def check_file_query(secret: str, key: str, query: str, *, method: str) -> bool:
    """Whether ``query`` (a raw query string) signs ``key`` for ``method``, unexpired."""
    params = dict(parse_qsl(query))
    scope = "file " + ("GET" if method.upper() == "GET" else method.upper())
    return check_signature(secret, key, params.get("exp", ""), params.get("sig", ""), scope=scope)


OFFLOAD_FILE_HEADER = "X-QProxy-Body-File"
# Other hosts (nginx elsewhere, operators) send QPROXY_ADMIN_TOKEN in this header.
TOKEN_HEADER = "X-QProxy-Token"
OFFLOAD_TOKEN_HEADER = "X-QProxy-Body-Token"


def offload_token(secret: str) -> str:
    """What nginx sends beside an offloaded body's path (``nginx-config --offload``), so a
    client talking to the app directly cannot name a file for it to take."""
    return hmac.new(secret.encode(), b"qproxy offload body file", hashlib.sha256).hexdigest()


def check_offload_token(secret: str, token: str) -> bool:
    return bool(secret) and hmac.compare_digest(offload_token(secret), token)
