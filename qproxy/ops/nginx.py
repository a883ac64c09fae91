"""nginx configuration for a qproxy node, as ``qproxy nginx-config`` prints it.

Every directive here follows how nginx actually behaves (see DESIGN.md, "nginx, as nginx
actually behaves"); the comments in the output say why each one is there.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from qproxy.config import DEFAULT_INLINE_TYPES, Config
from qproxy.core.decision import BLOB_PREFIX, MAX_RANGES, MEDIA_CSP, NOSNIFF
from qproxy.errors import ConfigError
from qproxy.headers import OFFLOAD_FILE_HEADER, OFFLOAD_TOKEN_HEADER, offload_token

Mode = Literal["x-accel", "auth_request"]


def find_nginx() -> str | None:
    """The nginx binary on this machine (Debian installs it outside a user's PATH)."""
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )


# Range and conditional headers are for nginx's static handler, not for the resolver: the
# resolver's answer must not depend on them (and must not be a 206/304).
_STRIP = (
    "Range",
    "If-Range",
    "If-Match",
    "If-None-Match",
    "If-Modified-Since",
    "If-Unmodified-Since",
)

MIME_TYPES = """\
    types {
        text/html html htm;
        text/css css;
        text/plain txt;
        text/csv csv;
        application/javascript js;
        application/json json;
        application/xml xml;
        application/pdf pdf;
        application/zip zip;
        application/gzip gz;
        image/jpeg jpeg jpg;
        image/png png;
        image/gif gif;
        image/webp webp;
        image/avif avif;
        image/svg+xml svg;
        audio/mpeg mp3;
        audio/ogg ogg;
        video/mp4 mp4;
        video/webm webm;
    }
    default_type application/octet-stream;
"""


@dataclass(frozen=True)
class NginxOptions:
    listen: str = "127.0.0.1:8080"
    app: str = "http://127.0.0.1:8000"
    resolver: str = "http://127.0.0.1:8300"
    mode: Mode = "x-accel"
    local_cache_seconds: int = 60
    # Micro-caching of the resolver's answers (hot keys): each answer is reused for the
    # X-Accel-Expires the resolver sends (1 s for local files, never for a 404).
    micro_cache: bool = False
    # Debian's nginx has /var/lib/nginx (and no /var/cache/nginx); nginx makes the rest.
    micro_cache_path: str = "/var/lib/nginx/qproxy-cache"
    # Offload mode: on QPROXY_RAW_UPLOAD_PATHS nginx writes the body to disk itself and
    # hands the app its path; qproxy hashes it and renames it into the store.
    offload: bool = False
    # Files read from other web nodes kept here for a while (by their SHA-256) in this
    # folder, a filesystem of its own (empty: off): read again here, one is a local file.
    peer_cache: str = ""
    # The other web nodes' QPROXY_NODE_URLs: nginx keeps connections to them open (a node
    # not named here is still reached, on a new connection for each read).
    peers: tuple[str, ...] = ()


# The peer cache: how long a file read from another node is served from this node's copy,
# and the smallest file it leaves out (a big file read once would push out many small ones).
PEER_CACHE_SECONDS = 60
PEER_CACHE_FILE_DIGITS = 7  # files whose size has at most this many digits (< 10 MB)


def _hostport(url: str, what: str, *, port_optional: bool = False) -> str:
    """``url``'s HOST:PORT for nginx (``port_optional``: HOST alone where it has none, as a
    node URL on port 80 is written into /_qp/peer/)."""
    parts = urlsplit(url if "://" in url else "http://" + url)
    try:
        port = parts.port
    except ValueError:  # not a number, or out of range
        port = None
    if parts.scheme != "http" or not parts.hostname or not (port or port_optional):
        shape = "http://HOST[:PORT]" if port_optional else "http://HOST:PORT"
        raise ConfigError(f"{what} must look like {shape}, got {url!r}")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{host}:{port}" if port else host


def _quote(path: str) -> str:
    # nginx expands variables in alias/root: a "$" in the path cannot be written safely.
    if "$" in path or any(c in path for c in "\r\n\x00"):
        raise ConfigError(f"QPROXY_LOCAL_ROOT {path!r} cannot be used in nginx's config")
    return '"' + path.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _proxy_common(indent: str) -> str:
    lines = [
        "proxy_http_version 1.1;",
        'proxy_set_header Connection "";',
        "proxy_set_header Host $host;",
        "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
        "proxy_set_header X-Forwarded-Proto $scheme;",
    ]
    return "".join(f"{indent}{line}\n" for line in lines)


def _resolver_headers(indent: str, token: str = "", *, conditional: bool = False) -> str:
    """Only the headers set here reach the resolver. ``conditional``: the client's Range and
    conditional headers go too (a peer's blob answers them as nginx does a local file)."""
    if any(c in token for c in '"\\$\r\n\x00;{}'):
        raise ConfigError("QPROXY_ADMIN_TOKEN cannot be written into nginx's config")
    lines = [
        "# The resolver needs none of the client's headers (cookies included): only the ones",
        "# set here go.",
        "proxy_pass_request_headers off;",
        "proxy_pass_request_body off;",
        'proxy_set_header Content-Length "";',
    ]
    for name in _STRIP:
        value = f"$http_{name.lower().replace('-', '_')}" if conditional else '""'
        lines.append(f"proxy_set_header {name} {value};")
    if token:
        lines.append(f'proxy_set_header X-QProxy-Token "{token}";')
    return "".join(f"{indent}{line}\n" for line in lines)


def _micro_cache(indent: str) -> str:
    lines = [
        "proxy_cache qproxy_decisions;",
        "# The resolver's answer differs for HEAD (a presigned URL signs its method).",
        "proxy_cache_convert_head off;",
        "proxy_cache_key $request_method$request_uri;",
        "# An expired answer is refreshed by one request in the background while the others",
        "# still get it (a lock instead would park them for nginx's 500 ms lock poll).",
        "proxy_cache_use_stale updating;",
        "proxy_cache_background_update on;",
        "# The TTL is the resolver's X-Accel-Expires (0: not cached); the client-facing",
        "# Cache-Control (private) must not keep nginx from caching.",
        "proxy_ignore_headers Cache-Control Expires Set-Cookie;",
        "# Cached answers are small files: keep them open between hits (measured +15% req/s;",
        "# an answer may then outlive its TTL by up to 1 s).",
        "open_file_cache max=10000 inactive=10s;",
        "open_file_cache_valid 1s;",
    ]
    return "".join(f"{indent}{line}\n" for line in lines)


def _glob_location(pattern: str) -> str:
    """An nginx regex location matching what fnmatch matches (QPROXY_RAW_UPLOAD_PATHS)."""
    if any(c in pattern for c in '"\\$\r\n\x00') or not pattern.startswith("/"):
        raise ConfigError(f"raw upload path {pattern!r} cannot be used in nginx's config")
    return f'~ "^{fnmatch.translate(pattern)}"'


I1, I2 = "    ", "        "


def _lines(indent: str, *lines: str) -> str:
    return "".join(f"{indent}{line}\n" if line else "\n" for line in lines)


def _location(header: str, *body: str) -> str:
    """One location block inside the server block; ``body`` holds ready-indented text."""
    return f"{I1}location {header} {{\n" + "".join(body) + f"{I1}}}\n"


def _open_files(comment: str) -> str:
    return _lines(
        I2, comment, "open_file_cache max=10000 inactive=30s;", "open_file_cache_valid 1s;"
    )


def _file_answer(*, links: bool = True) -> str:
    """What every answer carrying a file's bytes gets: no type sniffing, a sandboxing CSP (an
    upload never runs script in the site's origin), a cap on ranges and, where nginx opens
    the file itself, no symlink followed under the root."""
    lines = [
        f"add_header X-Content-Type-Options {NOSNIFF} always;",
        f'add_header Content-Security-Policy "{MEDIA_CSP}" always;',
        f"max_ranges {MAX_RANGES};",
    ]
    if links:
        lines.append("disable_symlinks on from=$document_root;")
    return _lines(I2, *lines)


# Extensions of the types a browser may show inline. In auth_request mode nginx picks a
# local file's type from its key's extension: only these (as far as QPROXY_INLINE_TYPES
# allows them) get their own type, every other file is application/octet-stream.
EXTENSIONS = {
    "image/png": "png",
    "image/jpeg": "jpg jpeg",
    "image/gif": "gif",
    "image/webp": "webp",
    "image/avif": "avif",
    "image/bmp": "bmp",
    "audio/mpeg": "mp3",
    "audio/ogg": "ogg oga",
    "audio/wav": "wav",
    "audio/flac": "flac",
    "video/mp4": "mp4 m4v",
    "video/webm": "webm",
    "video/ogg": "ogv",
    "application/pdf": "pdf",
    "text/plain": "txt",
}


def _shown_types(inline: tuple[str, ...]) -> str:
    allowed = [
        f"{mimetype} {exts};"
        for mimetype, exts in EXTENSIONS.items()
        if any(fnmatch.fnmatchcase(mimetype, pattern) for pattern in inline)
    ]
    return (
        _lines(I2, "# Inline only what a browser cannot run (QPROXY_INLINE_TYPES).", "types {")
        + _lines(I2 + "    ", *allowed)
        + _lines(I2, "}", "default_type application/octet-stream;")
    )


def upstreams(app: str, resolver: str) -> str:
    """The app and the resolver, with kept-alive connections."""
    return (
        "upstream qproxy_app {\n"
        + _lines(I1, f"server {app};", "keepalive 16;")
        + "}\n\n"
        + "upstream qproxy_resolver {\n"
        + _lines(I1, f"server {resolver};", "keepalive 32;")
        + "}\n\n"
    )


# Idle connections nginx keeps to each named peer, per worker (measured: 16 with 32 clients
# reading from one peer still opened ~1 connection in 5 reads; 32 opened none).
PEER_KEEPALIVE = 32


def peer_upstreams(peers: Sequence[str]) -> str:
    """``--peer``: an upstream with kept-alive connections for each other web node, and the
    map from the node in a /_qp/peer/ URL (its QPROXY_NODE_URL's host:port) to it. Without
    one, nginx opens a connection for each read from that node and closes it after (measured
    on "serve 64 KiB held by another web node": +10-30% req/s kept alive). The upstreams' names
    cannot be a node's: the /_qp/peer/ location takes no "_" in a node."""
    nodes: dict[str, str] = {}
    for url in peers:
        node = _hostport(url, "--peer", port_optional=True)
        nodes.setdefault(node, f"qproxy_peer_{len(nodes)}")
    if not nodes:
        return ""
    lines = ["# The other web nodes (--peer), by their QPROXY_NODE_URL: connections kept open."]
    lines += ["map $qp_peer_node $qp_peer_upstream {", f"{I1}default $qp_peer_node;"]
    lines += [f'{I1}"{node}" {name};' for node, name in nodes.items()]
    lines.append("}")
    for node, name in nodes.items():
        lines += [
            f"upstream {name} {{",
            f"{I1}server {node};",
            f"{I1}keepalive {PEER_KEEPALIVE};",
            "}",
        ]
    return "\n".join(lines) + "\n\n"


def micro_cache_zone(path: str) -> str:
    return (
        "# Micro-cache of the resolver's answers (hot keys cost no Redis lookup).\n"
        f"proxy_cache_path {_quote(path)} levels=1:2"
        " keys_zone=qproxy_decisions:10m max_size=256m inactive=60s use_temp_path=off;\n\n"
    )


def peer_cache_size(path: str) -> int:
    """The most the peer cache at ``path`` may hold: half its filesystem. It must be a
    filesystem of its own: nginx cuts an answer short when it cannot write the copy it is
    keeping (measured: a full disk under the cache gave clients truncated bodies), so no
    one else may fill it, and nginx's own limit is enforced late (every few seconds)."""
    if any(c in path for c in " ;{}'\"\\$\r\n\x00") or not os.path.isabs(path):
        raise ConfigError(f"--peer-cache needs an absolute folder, got {path!r}")
    if not os.path.ismount(path):
        raise ConfigError(
            f"--peer-cache {path}: not a filesystem of its own. nginx cuts a download short "
            "when the disk under its cache is full, so the peer cache needs one nothing else "
            f"writes to, e.g. `mount -t tmpfs -o size=2g,mode=755 tmpfs {path}`"
        )
    fs = os.statvfs(path)
    return fs.f_blocks * fs.f_frsize // 2


def peer_cache_zone(path: str, *, subrequest: bool) -> str:
    """``--peer-cache``: the cache of files read from other nodes, and what it leaves out.
    The file's hash is the peer URL's ``h``: its query after an X-Accel-Redirect; after a
    subrequest's rewrite (auth_request mode, or the micro-cache) the whole URL is the path,
    so it is read from $qp_peer."""
    size = peer_cache_size(path)
    if not subrequest:
        source, pattern = "$arg_h", "^([0-9a-f]{64})$"
    else:
        source, pattern = "$qp_peer", "[?&]h=([0-9a-f]{64})$"
    return (
        "# Files read from other web nodes (--peer-cache), kept by their SHA-256: read\n"
        f"# again here within {PEER_CACHE_SECONDS} s, one is served from this copy. Only after\n"
        "# the resolver said where it is, as every file: a deleted file is not served.\n"
        "# A filesystem of its own, at most half of it used (nginx cuts a download short\n"
        "# when it cannot write the copy).\n"
        f"proxy_cache_path {_quote(path)} levels=1:2 keys_zone=qproxy_peer_files:10m"
        f" max_size={size} inactive={PEER_CACHE_SECONDS}s use_temp_path=off;\n"
        f"map {source} $qp_peer_hash {{\n"
        f'{I1}"~{pattern}" $1;\n'
        f'{I1}default "";\n'
        "}\n"
        "# Not cached: an answer without the file's hash, and files of 10 MB or more.\n"
        "map $qp_peer_hash $qp_peer_unhashed {\n"
        f'{I1}"" 1;\n'
        f'{I1}default "";\n'
        "}\n"
        "map $upstream_http_content_length $qp_peer_big {\n"
        f'{I1}"~^[0-9]{{1,{PEER_CACHE_FILE_DIGITS}}}$" "";\n'
        f"{I1}default 1;\n"
        "}\n\n"
    )


def _peer_cache() -> str:
    return _lines(
        I2,
        "# --peer-cache: one file's bytes by their hash, whichever node sent them.",
        "proxy_cache qproxy_peer_files;",
        "proxy_cache_key $qp_peer_hash;",
        "proxy_cache_bypass $qp_peer_unhashed;",
        "proxy_no_cache $qp_peer_unhashed $qp_peer_big;",
        f"proxy_cache_valid 200 {PEER_CACHE_SECONDS}s;",
        "proxy_ignore_headers Cache-Control Expires Set-Cookie X-Accel-Expires;",
        "# Range and 304 from the cached copy, as from a local file.",
        "proxy_force_ranges on;",
        "add_header X-QProxy-Cache $upstream_cache_status always;",
    )


def location_app() -> str:
    """Everything but the files: to the app, uploads streamed through."""
    return _lines(
        I1,
        "# Everything but the files goes to the app. Uploads stream through: with request",
        "# buffering on, nginx would spool the whole body to disk before the app saw a byte",
        "# (and HTTP/1.1 is needed to stream chunked bodies).",
    ) + _location(
        "/",
        _lines(I2, "proxy_pass http://qproxy_app;"),
        _proxy_common(I2),
        _lines(
            I2,
            "proxy_request_buffering off;",
            "proxy_read_timeout 600s;",
            "proxy_send_timeout 600s;",
        ),
    )


def location_tus(config: Config, token: str = "") -> str:
    """QPROXY_TUS_PATH: resumable uploads, each request to the app of the node that holds
    the upload (the resolver says which: an upload's id names its node), bodies streamed
    through (that node's middleware fsyncs before it answers the offset)."""
    path = config.tus_path
    if any(c in path for c in ' "\\$;{}\r\n\x00'):
        raise ConfigError(f"QPROXY_TUS_PATH {path!r} cannot be used in nginx's config")
    return (
        _lines(
            I1,
            "# Resumable uploads (tus): every method (OPTIONS, POST, HEAD, PATCH, DELETE) to",
            "# the middleware of the node holding the upload: this node's app, or another",
            "# node's nginx (X-QP-Tus-Hop: it sends it on to its own app). Bodies streamed,",
            "# answers never cached, no gzip of tus answers.",
        )
        + _location(
            f"^~ {path}",
            _lines(
                I2,
                "auth_request /_qp/tus-route;",
                "auth_request_set $qp_tus_upstream $upstream_http_x_qp_tus_upstream;",
                "auth_request_set $qp_tus_hop $upstream_http_x_qp_tus_hop;",
                "proxy_pass http://$qp_tus_upstream$request_uri;",
            ),
            _proxy_common(I2),
            _lines(
                I2,
                "proxy_set_header X-QP-Tus-Hop $qp_tus_hop;",
                "proxy_request_buffering off;",
                "proxy_buffering off;",
                "gzip off;",
                f"proxy_connect_timeout {PEER_CONNECT_TIMEOUT}s;",
                "proxy_read_timeout 600s;",
                "proxy_send_timeout 600s;",
                "# A node that does not answer (or no routing): 503 and when to try again,",
                "# which tus clients retry; never a 404, which would make them start over.",
                "error_page 500 502 503 504 = @qp_tus_down;",
            ),
        )
        + _location(
            "= /_qp/tus-route",
            _lines(I2, "internal;", "proxy_pass http://qproxy_resolver/tus-route;"),
            _proxy_common(I2),
            _resolver_headers(I2, token),
            _lines(
                I2,
                "proxy_set_header X-Original-URI $request_uri;",
                "proxy_set_header X-Original-Method $request_method;",
                "proxy_set_header X-HTTP-Method-Override $http_x_http_method_override;",
                "proxy_set_header Upload-Concat $http_upload_concat;",
                "proxy_set_header X-QP-Tus-Hop $http_x_qp_tus_hop;",
            ),
        )
        + _location(
            "@qp_tus_down",
            _lines(
                I2,
                f"add_header Retry-After {PEER_RETRY_AFTER} always;",
                "add_header Tus-Resumable 1.0.0 always;",
                'add_header Cache-Control "no-store" always;',
                "return 503;",
            ),
        )
    )


def location_offload(config: Config, pattern: str) -> str:
    """One raw-body upload path whose body nginx writes to disk itself (``--offload``)."""
    folder = (config.local_path / ".qp" / "offload").as_posix()
    return _location(
        _glob_location(pattern),
        _lines(
            I2,
            f"client_body_temp_path {_quote(folder)};",
            "client_body_in_file_only clean;",
            "client_body_buffer_size 1m;",
            "proxy_pass http://qproxy_app;",
        ),
        _proxy_common(I2),
        _lines(
            I2,
            "proxy_pass_request_body off;",
            'proxy_set_header Content-Length "";',
            f"proxy_set_header {OFFLOAD_FILE_HEADER} $request_body_file;",
            f'proxy_set_header {OFFLOAD_TOKEN_HEADER} "{offload_token(config.secret)}";',
            "proxy_read_timeout 600s;",
        ),
    )


def _offload(config: Config) -> str:
    if not config.raw_paths:
        raise ConfigError("--offload needs QPROXY_RAW_UPLOAD_PATHS (the raw-body upload paths)")
    if not config.secret:
        raise ConfigError("--offload needs QPROXY_SECRET (nginx proves the file is its own)")
    intro = _lines(
        I1,
        "# Offload: raw-body uploads are written to disk by nginx itself, in the store's",
        "# own filesystem; the app gets the file's path (and a token only nginx knows) and",
        "# qproxy hashes it and renames it into place. nginx's cleanup removes it if the",
        "# app refused the upload. The app must run as nginx's worker user (or root): nginx",
        "# writes these files 0600.",
    )
    return intro + "".join(location_offload(config, p) + "\n" for p in config.raw_paths)


def location_public_x_accel(public: str, *, token: str = "") -> str:
    """The public path in X-Accel mode: ask the resolver."""
    return _lines(
        I1,
        "# Files: ask the resolver where each one is right now. It answers an empty 200",
        "# with X-Accel-Redirect (local or peer), a 302 to S3, or a 404.",
    ) + _location(
        f"^~ {public}",
        _lines(I2, "proxy_pass http://qproxy_resolver/resolve/;"),
        _proxy_common(I2),
        _resolver_headers(I2, token),
    )


def location_local(root: str, *, cache: str) -> str:
    """Local files, reachable only through the resolver's X-Accel-Redirect."""
    return _lines(
        I1,
        "# Local files. internal: reachable only through the resolver's X-Accel-Redirect.",
        "# nginx serves Range, HEAD, ETag and 304 itself. A file dropped between the",
        "# resolver's answer and this read is asked for again (@qp_retry), never a 404.",
    ) + _location(
        "^~ /_qp/local/",
        _lines(I2, "internal;", f"alias {_quote(root)};"),
        _lines(
            I2, cache, "add_header X-QProxy-Source local always;", "error_page 404 = @qp_retry;"
        ),
        _file_answer(),
    )


def location_public_auth(
    public: str,
    root: str,
    *,
    cache: str,
    micro: bool,
    inline: tuple[str, ...] = DEFAULT_INLINE_TYPES,
    record_types: bool = False,
) -> str:
    """The public path in auth_request mode: the subrequest's headers say where to look.
    ``record_types``: each file's type is its record's (as X-Accel mode sends it), not its
    extension's."""
    hot = (
        _open_files("# Hot files stay open (up to 1 s late for a replaced file).") if micro else ""
    )
    if record_types:
        types = _lines(
            I2,
            "# The type the resolver says (the record's, made safe), as in X-Accel mode: no",
            "# type of nginx's own (an empty default adds none), the resolver's added.",
            "types {}",
            'default_type "";',
            "add_header Content-Type $qp_type;",
        )
    else:
        types = _shown_types(inline)
    return _lines(
        I1,
        "# Files, auth_request mode: the subrequest to the resolver always answers 200",
        "# (auth_request turns anything but 2xx/401/403 into a 500) with X-QP-* headers.",
        "# try_files runs after the access phase, so it sees them; `if` would run too early.",
    ) + _location(
        f"^~ {public}",
        _lines(
            I2,
            "auth_request /_qp/auth;",
            "auth_request_set $qp_path $upstream_http_x_qp_path;",
            "auth_request_set $qp_url $upstream_http_x_qp_location;",
            "auth_request_set $qp_peer $upstream_http_x_qp_peer;",
            "auth_request_set $qp_disposition $upstream_http_x_qp_disposition;",
            "auth_request_set $qp_cache $upstream_http_x_qp_cache_control;",
            *(
                ["auth_request_set $qp_type $upstream_http_x_qp_content_type;"]
                if record_types
                else []
            ),
            f"root {_quote(root.rstrip('/') or '/')};",
            cache,
            "add_header Content-Disposition $qp_disposition;",
            "add_header X-QProxy-Source local always;",
            "# try_files does no '..' check: the resolver alone guards X-QP-Path.",
            "try_files $qp_path @qp_remote;",
        ),
        _file_answer(),
        types,
        hot,
    )


def location_auth(*, micro: bool, token: str = "") -> str:
    """The auth_request subrequest to the resolver (cached with ``--micro-cache``)."""
    return _location(
        "= /_qp/auth",
        _lines(I2, "internal;", "proxy_pass http://qproxy_resolver/auth;"),
        _proxy_common(I2),
        _resolver_headers(I2, token),
        _micro_cache(I2) if micro else "",
        _lines(
            I2,
            "proxy_set_header X-Original-URI $request_uri;",
            "proxy_set_header X-Original-Method $request_method;",
        ),
    )


def location_remote() -> str:
    """auth_request mode's branch when the file is not on this disk: retry, peer or S3."""
    return _location(
        "@qp_remote",
        _lines(
            I2,
            "# The resolver said local but the file is gone (dropped meanwhile): ask again.",
            "error_page 418 = @qp_retry;",
            'if ($qp_path != "") {',
            "    return 418;",
            "}",
            'if ($qp_peer != "") {',
            "    rewrite ^ $qp_peer last;",
            "}",
            "# An empty $qp_url would give a 302 with an empty Location.",
            'if ($qp_url = "") {',
            "    return 404;",
            "}",
            "# The resolver's Cache-Control: short for a redirect, none for a private file.",
            "add_header Cache-Control $qp_cache always;",
            "return 302 $qp_url;",
        ),
    )


def location_retry(token: str = "") -> str:
    """A local file that vanished: ask the resolver again, which then answers from S3."""
    return _lines(
        I1, "# Asked again with X-QP-Retry: the resolver then answers from S3 (or 404)."
    ) + _location(
        "@qp_retry",
        _lines(
            I2,
            "# $request_uri: after an X-Accel-Redirect, $uri is the internal /_qp/ path.",
            "proxy_pass http://qproxy_resolver$request_uri;",
        ),
        _proxy_common(I2),
        _resolver_headers(I2, token),
        _lines(I2, "proxy_set_header X-QP-Retry 1;"),
    )


# A peer that does not answer: how long nginx waits to connect, and between two reads (the
# read timeout measures progress, not the whole answer).
def location_blob(root: str) -> str:
    """This node's files for the other nodes (their nginx, their workers), at the URLs
    their resolvers signed: this node's resolver checks each, nginx sends the bytes."""
    return (
        _lines(
            I1,
            "# This node's files for other nodes and the workers (QPROXY_NODE_URL may name this",
            "# nginx): the resolver checks the signed URL, nginx sends the file (Range, HEAD,",
            "# ETag and 304 as for a local file).",
        )
        + _location(
            "^~ /internal/blob/",
            _lines(I2, "proxy_pass http://qproxy_resolver;"),
            _proxy_common(I2),
            _resolver_headers(I2),
            _lines(I2, "proxy_set_header X-QP-Blob-Send 1;"),
        )
        + _location(
            f"^~ {BLOB_PREFIX}",
            _lines(I2, "internal;", f"alias {_quote(root)};"),
            _file_answer(),
        )
    )


PEER_CONNECT_TIMEOUT = 2
PEER_READ_TIMEOUT = 10
PEER_RETRY_AFTER = 5


def location_peer(*, cache: bool = False, peers: bool = False) -> str:
    """A file on another web node: proxied from that node's resolver (a signed URL), as a
    local file is served (Range, HEAD, 304), streamed through without a temporary file;
    ``cache`` (--peer-cache): kept here a while, by its hash, if under 10 MB; ``peers``:
    through :func:`peer_upstreams`' map, on kept-alive connections to the nodes it names."""
    target = "$qp_peer_upstream" if peers else "$qp_peer_node"
    return (
        _lines(
            I1,
            "# A file on another web node: proxied from that node's resolver, whose",
            "# /internal/blob URL the resolver signed.",
        )
        + _location(
            "~ ^/_qp/peer/(?<qp_peer_node>[A-Za-z0-9.:\\[\\]-]+)/(?<qp_peer_key>.*)$",
            _lines(
                I2,
                "internal;",
                f"proxy_pass http://{target}/internal/blob/$qp_peer_key$is_args$args;",
            ),
            _proxy_common(I2),
            _resolver_headers(I2, conditional=True),
            _lines(
                I2,
                "# Streamed to the client as it comes: never spooled to this node's disk.",
                "proxy_max_temp_file_size 0;",
                f"proxy_connect_timeout {PEER_CONNECT_TIMEOUT}s;",
                f"proxy_read_timeout {PEER_READ_TIMEOUT}s;",
                f"proxy_send_timeout {PEER_READ_TIMEOUT}s;",
                "# The peer no longer has it (it reached S3 meanwhile): ask the resolver again.",
                "# A peer that does not answer: 503 and when to try again, not 502/504.",
                "proxy_intercept_errors on;",
                "error_page 404 = @qp_retry;",
                "error_page 500 502 503 504 = @qp_peer_down;",
                "add_header X-QProxy-Source peer always;",
                "# The peer sends them too; this location's own are the ones that count.",
                "proxy_hide_header X-Content-Type-Options;",
                "proxy_hide_header Content-Security-Policy;",
            ),
            _peer_cache() if cache else "",
            _file_answer(links=False),
        )
        + _location(
            "@qp_peer_down",
            _lines(
                I2,
                f"add_header Retry-After {PEER_RETRY_AFTER} always;",
                'add_header Cache-Control "no-store" always;',
                "return 503;",
            ),
        )
    )


def server_block(config: Config, options: NginxOptions) -> str:
    """The ``upstream`` and ``server`` blocks, to include in an ``http {}`` context."""
    if options.mode not in ("x-accel", "auth_request"):
        raise ConfigError(f"unknown nginx mode {options.mode!r} (x-accel or auth_request)")
    app = _hostport(options.app, "--app")
    resolver = _hostport(options.resolver, "--resolver")
    public = config.public_path
    root = config.local_path.as_posix().rstrip("/") + "/"
    cache = f'add_header Cache-Control "private, max-age={options.local_cache_seconds}" always;'
    micro = options.micro_cache
    # nginx never caches an answer it acts on (an X-Accel-Redirect): with the micro-cache,
    # X-Accel mode asks with a cached subrequest too, as auth_request mode does (measured:
    # ~0.9x of static for a hot key, against ~0.7x through a second, caching server).
    subrequest = options.mode == "auth_request" or micro
    # Sent to the resolver, which serves other hosts only /internal/blob without it.
    token = config.admin_token
    out = [
        f"# qproxy node ({options.mode} mode) - generated by `qproxy nginx-config`\n",
        upstreams(app, resolver),
        peer_upstreams(options.peers),
    ]
    if micro:
        out.append(micro_cache_zone(options.micro_cache_path))
    if options.peer_cache:
        out.append(peer_cache_zone(options.peer_cache, subrequest=subrequest))
    out += [
        "server {\n",
        _lines(
            I1,
            f"listen {options.listen};",
            "# Matches QPROXY_MAX_UPLOAD_BYTES: nginx answers 413 before the app sees a byte.",
            f"client_max_body_size {config.max_upload_bytes};",
            "",
        ),
        location_app(),
        "\n",
    ]
    if config.tus_path:
        out += [location_tus(config, token), "\n"]
    if options.offload:
        out.append(_offload(config))
    if not subrequest:
        out += [
            location_public_x_accel(public, token=token),
            "\n",
            location_local(root, cache=cache),
            "\n",
        ]
    else:
        record_types = options.mode == "x-accel"
        out += [
            location_public_auth(
                public,
                root,
                cache=cache,
                micro=micro,
                inline=config.inline,
                record_types=record_types,
            ),
            "\n",
            location_auth(micro=micro, token=token),
            "\n",
            location_remote(),
            "\n",
        ]
    out += [
        location_retry(token),
        "\n",
        location_peer(cache=bool(options.peer_cache), peers=bool(options.peers)),
        "\n",
        location_blob(root),
        "}\n",
    ]
    return "".join(out)


def full_config(config: Config, options: NginxOptions) -> str:
    """A complete nginx.conf, runnable as ``nginx -p DIR -c FILE`` as root or not.

    Relative paths resolve against the prefix (``-p DIR``), so an ordinary user can run it.
    Started as root, nginx's workers run as ``nobody``: stored files must be world-readable
    (qproxy writes them 0644 in 0755 folders).
    """
    if options.micro_cache and options.micro_cache_path == NginxOptions.micro_cache_path:
        # Relative to the prefix, like the other temp folders.
        options = dataclasses.replace(options, micro_cache_path="qproxy_decisions")
    body = server_block(config, options)
    indented = "".join(("    " + line if line.strip() else line) for line in body.splitlines(True))
    return (
        "# Complete nginx.conf for one qproxy node - generated by `qproxy nginx-config --full`.\n"
        "# Run: nginx -p DIR -c FILE   (logs, pid and temp folders go under DIR)\n"
        "worker_processes auto;\n"
        "pid nginx.pid;\n"
        "error_log error.log warn;\n\n"
        "events {\n    worker_connections 1024;\n}\n\n"
        "http {\n"
        "    # Buffered: one write per 64 KiB or second, not one per request.\n"
        "    access_log access.log combined buffer=64k flush=1s;\n"
        "    client_body_temp_path client_body_temp;\n"
        "    proxy_temp_path proxy_temp;\n"
        "    fastcgi_temp_path fastcgi_temp;\n"
        "    uwsgi_temp_path uwsgi_temp;\n"
        "    scgi_temp_path scgi_temp;\n"
        "    server_tokens off;\n"
        "    sendfile on;\n"
        "    # tcp_nopush stays off: measured here it put p99 at ~41 ms on every path.\n"
        "    tcp_nodelay on;\n"
        "    keepalive_timeout 65;\n"
        f"{MIME_TYPES}\n"
        f"{indented}"
        "}\n"
    )
