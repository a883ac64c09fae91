"""Response header values built from untrusted metadata (filenames), safely."""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from urllib.parse import quote

_UNSAFE_ASCII = re.compile(r"[^A-Za-z0-9 !#$&+\-.^_`|~()\[\]{}@,=]")


def content_disposition(filename: str, *, disposition: str = "inline") -> str:
    """``inline; filename="..."; filename*=UTF-8''...`` (RFC 6266), no way to inject a header."""
    if not filename:
        return disposition
    ascii_name = _UNSAFE_ASCII.sub("_", filename.encode("ascii", "replace").decode())[:150]
    encoded = quote(filename, safe="")
    return f"{disposition}; filename=\"{ascii_name}\"; filename*=UTF-8''{encoded}"


def sign(secret: str, key: str, expires: int) -> str:
    """HMAC over a key and an expiry: the signature of internal blob URLs."""
    message = f"{key}\n{expires}".encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def signed_query(secret: str, key: str, ttl: int = 300) -> str:
    expires = int(time.time()) + ttl
    return f"exp={expires}&sig={sign(secret, key, expires)}"


def check_signature(secret: str, key: str, expires: str, signature: str) -> bool:
    if not secret:
        return False
    try:
        exp = int(expires)
    except ValueError:
        return False
    if exp < time.time():
        return False
    return hmac.compare_digest(sign(secret, key, exp), signature)


OFFLOAD_FILE_HEADER = "X-QProxy-Body-File"
OFFLOAD_TOKEN_HEADER = "X-QProxy-Body-Token"


def offload_token(secret: str) -> str:
    """What nginx sends beside an offloaded body's path (``nginx-config --offload``), so a
    client talking to the app directly cannot name a file for it to take."""
    return hmac.new(secret.encode(), b"qproxy offload body file", hashlib.sha256).hexdigest()


def check_offload_token(secret: str, token: str) -> bool:
    return bool(secret) and hmac.compare_digest(offload_token(secret), token)
