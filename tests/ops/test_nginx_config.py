"""The nginx configs we ship and generate pass `nginx -t`, as root and as an ordinary user."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from qproxy.config import Config
from qproxy.errors import ConfigError
from qproxy.ops import nginx
from qproxy.ops.nginx import NginxOptions, find_nginx, full_config, server_block
from tests.conftest import tmpfs

ROOT = Path(__file__).resolve().parents[2]
NGINX = find_nginx()
pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx is not installed")

CONFIG = Config(local_root="/srv/qproxy files", max_upload_bytes=5 * 1024**3, s3_bucket="b")


@pytest.fixture
def prefix() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="qproxy-nginx-"))
    os.chmod(path, 0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def nginx_t(
    conf: Path, prefix: Path, *, user: str | None = None
) -> subprocess.CompletedProcess[str]:
    assert NGINX is not None
    argv = [NGINX, "-t", "-p", str(prefix), "-c", str(conf), "-e", "stderr"]
    if user:
        argv = ["setpriv", f"--reuid={user}", "--regid=nogroup", "--clear-groups", *argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("mode", ["x-accel", "auth_request"])
def test_full_config_passes_nginx_t(prefix: Path, mode: str) -> None:
    conf = prefix / "nginx.conf"
    conf.write_text(full_config(CONFIG, NginxOptions(mode=mode)))  # type: ignore[arg-type]
    result = nginx_t(conf, prefix)
    assert result.returncode == 0, result.stderr
    text = conf.read_text()
    assert f"client_max_body_size {5 * 1024**3};" in text
    assert "proxy_request_buffering off;" in text


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to an ordinary user")
def test_full_config_runs_as_an_ordinary_user(prefix: Path) -> None:
    conf = prefix / "nginx.conf"
    conf.write_text(full_config(CONFIG, NginxOptions()))
    os.chmod(conf, 0o644)
    result = nginx_t(conf, prefix, user="nobody")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("mode", ["x-accel", "auth_request"])
def test_server_block_includes_into_http(prefix: Path, mode: str) -> None:
    block = server_block(CONFIG, NginxOptions(mode=mode, listen="127.0.0.1:9999"))  # type: ignore[arg-type]
    conf = prefix / "nginx.conf"
    conf.write_text(
        "pid nginx.pid;\nevents {}\nhttp {\n"
        "client_body_temp_path cb; proxy_temp_path pt; fastcgi_temp_path ft;\n"
        "uwsgi_temp_path ut; scgi_temp_path st;\n"
        f"{block}}}\n"
    )
    result = nginx_t(conf, prefix)
    assert result.returncode == 0, result.stderr


def test_shipped_example_passes_nginx_t(prefix: Path) -> None:
    conf = prefix / "nginx.conf"
    shutil.copy(ROOT / "nginx.conf.example", conf)
    result = nginx_t(conf, prefix)
    assert result.returncode == 0, result.stderr


def test_cli_prints_config_with_flags() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "qproxy",
            "nginx-config",
            "--mode",
            "auth_request",
            "--listen",
            "0.0.0.0:80",
            "--app",
            "http://127.0.0.1:9000",
            "--resolver",
            "http://127.0.0.1:9100",
        ],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "QPROXY_LOCAL_ROOT": "/data/files", "QPROXY_MAX_UPLOAD_BYTES": "1000"},
    ).stdout
    assert "listen 0.0.0.0:80;" in out
    assert "server 127.0.0.1:9000;" in out and "server 127.0.0.1:9100;" in out
    assert "auth_request /_qp/auth;" in out
    assert 'root "/data/files";' in out
    assert "client_max_body_size 1000;" in out


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
@pytest.mark.parametrize("mode", ["x-accel", "auth_request"])
def test_peer_cache_config_passes_nginx_t(prefix: Path, mode: str) -> None:
    with tmpfs(prefix / "peer-cache", size="8m") as folder:
        conf = prefix / "nginx.conf"
        options = NginxOptions(mode=mode, peer_cache=str(folder))  # type: ignore[arg-type]
        conf.write_text(full_config(CONFIG, options))
        result = nginx_t(conf, prefix)
        assert result.returncode == 0, result.stderr
        # At most half of its filesystem (nginx enforces its limit late).
        assert f'proxy_cache_path "{folder}" ' in conf.read_text()
        assert f"max_size={4 * 1024 * 1024} " in conf.read_text()


def test_peer_cache_refuses_a_folder_others_write_to(tmp_path: Path) -> None:
    """nginx cuts a download short when the disk under its cache is full: on the store's
    disk (or /var) that is a matter of time, so only a filesystem of its own is taken."""
    result = subprocess.run(
        [sys.executable, "-m", "qproxy", "nginx-config", "--peer-cache", str(tmp_path)],
        capture_output=True,
        text=True,
        env={**os.environ, "QPROXY_LOCAL_ROOT": str(tmp_path / "files")},
    )
    assert result.returncode == 2
    assert result.stderr.startswith(f"qproxy: --peer-cache {tmp_path}: not a filesystem of its own")
    assert "mount -t tmpfs" in result.stderr and "Traceback" not in result.stderr
    with pytest.raises(ConfigError, match="absolute"):
        server_block(CONFIG, NginxOptions(peer_cache="relative/dir"))


@pytest.mark.parametrize("mode", ["x-accel", "auth_request"])
def test_named_peers_config_passes_nginx_t(prefix: Path, mode: str) -> None:
    peers = (
        "http://10.0.0.2:8300",
        "10.0.0.3:8080",
        "http://[fd00::4]:8300",
        "http://10.0.0.2:8300",
        "http://localhost",  # (QPROXY_NODE_URL may leave the port at 80)
    )
    options = NginxOptions(mode=mode, peers=peers)  # type: ignore[arg-type]
    conf = prefix / "nginx.conf"
    conf.write_text(full_config(CONFIG, options))
    result = nginx_t(conf, prefix)
    assert result.returncode == 0, result.stderr
    text = conf.read_text()
    # One upstream each, named by what the resolver writes in /_qp/peer/ (host:port).
    for node in ("10.0.0.2:8300", "10.0.0.3:8080", "[fd00::4]:8300", "localhost"):
        assert text.count(f"server {node};") == 1, node
        assert f'"{node}" qproxy_peer_' in text
    assert "proxy_pass http://$qp_peer_upstream/internal/blob/" in text


def test_cli_takes_peers_and_refuses_a_bad_one() -> None:
    argv = [sys.executable, "-m", "qproxy", "nginx-config"]
    env = {**os.environ, "QPROXY_LOCAL_ROOT": "/data/files"}
    out = subprocess.run(
        [*argv, "--peer", "http://web2:8300", "--peer", "http://web3:8300"],
        capture_output=True, text=True, check=True, env=env,
    ).stdout  # fmt: skip
    assert "server web2:8300;\n    keepalive 32;" in out and "server web3:8300;" in out
    bad = subprocess.run([*argv, "--peer", "https://web2"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "--peer must look like http://HOST[:PORT], got 'https://web2'" in bad.stderr


def test_cli_rejects_bad_urls() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "qproxy", "nginx-config", "--app", "ftp://x"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "--app must look like http://HOST:PORT" in result.stderr


def test_x_accel_mode_caches_with_a_subrequest() -> None:
    """nginx never caches an answer it acts on: with the micro-cache, X-Accel mode asks with
    a cached subrequest, and sends each file with the type its record gives."""
    out = server_block(CONFIG, NginxOptions(micro_cache=True))
    assert "auth_request /_qp/auth;" in out and "proxy_cache qproxy_decisions;" in out
    assert "/resolve/" not in out and "/_qp/local/" not in out
    assert 'default_type "";' in out and "add_header Content-Type $qp_type;" in out
    # Without it, X-Accel-Redirect; auth_request mode keeps its types by extension.
    assert "/_qp/local/" in server_block(CONFIG, NginxOptions())
    auth = server_block(CONFIG, NginxOptions(mode="auth_request", micro_cache=True))
    assert "default_type application/octet-stream;" in auth and "$qp_type" not in auth


# -- each location on its own ------------------------------------------------------------------

ROOT_DIR = "/srv/qproxy files/"
CACHE = 'add_header Cache-Control "private, max-age=60" always;'
OFFLOAD = Config(
    local_root=tempfile.gettempdir() + "/qproxy-nginx-offload",
    s3_bucket="b",
    raw_upload_paths="/api/files/*",
    secret="s",
)
LOCATIONS = {
    "app": (nginx.location_app(), ["proxy_request_buffering off;", "proxy_read_timeout 600s;"]),
    "offload": (
        nginx.location_offload(OFFLOAD, "/api/files/*"),
        ["client_body_in_file_only clean;", "X-QProxy-Body-File $request_body_file;"],
    ),
    "public x-accel": (
        nginx.location_public_x_accel("/media/"),
        ["location ^~ /media/", "proxy_pass http://qproxy_resolver/resolve/;", "Range"],
    ),
    "local": (
        nginx.location_local(ROOT_DIR, cache=CACHE),
        [
            "internal;",
            'alias "/srv/qproxy files/";',
            "error_page 404 = @qp_retry;",
            "add_header X-Content-Type-Options nosniff always;",
            "max_ranges 16;",
            "disable_symlinks on from=$document_root;",
        ],
    ),
    "public auth_request": (
        nginx.location_public_auth("/media/", ROOT_DIR, cache=CACHE, micro=False),
        [
            "auth_request /_qp/auth;",
            "try_files $qp_path @qp_remote;",
            "add_header X-Content-Type-Options nosniff always;",
            "max_ranges 16;",
            "disable_symlinks on from=$document_root;",
            "default_type application/octet-stream;",
        ],
    ),
    "public auth_request, the record's types": (
        nginx.location_public_auth("/media/", ROOT_DIR, cache=CACHE, micro=True, record_types=True),
        [
            "auth_request_set $qp_type $upstream_http_x_qp_content_type;",
            'default_type "";',
            "add_header Content-Type $qp_type;",
            "open_file_cache max=10000 inactive=30s;",
        ],
    ),
    "auth": (
        nginx.location_auth(micro=False),
        ["location = /_qp/auth", "proxy_set_header X-Original-URI $request_uri;"],
    ),
    "auth, micro-cache": (nginx.location_auth(micro=True), ["proxy_cache qproxy_decisions;"]),
    "remote": (
        nginx.location_remote(),
        ['if ($qp_url = "") {', "return 302 $qp_url;", "add_header Cache-Control $qp_cache"],
    ),
    "retry": (
        nginx.location_retry(),
        ["proxy_set_header X-QP-Retry 1;", "proxy_pass http://qproxy_resolver$request_uri;"],
    ),
    "tus": (
        nginx.location_tus(Config.from_env({"QPROXY_TUS_PATH": "/files/"})),
        ["location ^~ /files/ {", "proxy_request_buffering off;", "proxy_buffering off;"],
    ),
    "peer": (
        nginx.location_peer(),
        [
            "internal;",
            "proxy_pass http://$qp_peer_node/internal/blob/$qp_peer_key$is_args$args;",
            "add_header X-Content-Type-Options nosniff always;",
        ],
    ),
}
# What a location refers to that lives outside it.
SUPPORT = """
    set $qp_path "";
    set $qp_peer "";
    set $qp_url "";
    set $qp_cache "";
    location = /_qp/auth { internal; return 200; }
    location @qp_remote { return 404; }
    location @qp_retry { return 404; }
"""


def _alone(location: str, prefix: Path) -> str:
    upstreams = nginx.upstreams("127.0.0.1:8000", "127.0.0.1:8300")
    zone = nginx.micro_cache_zone(str(prefix / "cache"))
    support = "".join(
        line + "\n"
        for line in SUPPORT.strip("\n").splitlines()
        if line.split("{")[0].strip() not in location
    )
    return (
        f"pid nginx.pid;\nerror_log stderr;\nevents {{}}\nhttp {{\n{upstreams}{zone}"
        f"server {{\n    listen 127.0.0.1:1;\n{location}{support}}}\n}}\n"
    )


@pytest.mark.parametrize("name", list(LOCATIONS))
def test_each_location_alone_passes_nginx_t(prefix: Path, name: str) -> None:
    text, must = LOCATIONS[name]
    (OFFLOAD.local_path / ".qp").mkdir(parents=True, exist_ok=True)
    for directive in must:
        assert directive in text, (name, directive)
    conf = prefix / "nginx.conf"
    conf.write_text(_alone(text, prefix))
    try:
        result = nginx_t(conf, prefix)
    finally:
        shutil.rmtree(OFFLOAD.local_path, ignore_errors=True)
    assert result.returncode == 0, result.stderr + conf.read_text()


def test_offload_config_passes_nginx_t_on_a_fresh_root(prefix: Path) -> None:
    root = prefix / "fresh" / "files"
    env = {
        **os.environ,
        "QPROXY_LOCAL_ROOT": str(root),
        "QPROXY_RAW_UPLOAD_PATHS": "/api/files/*",
        "QPROXY_SECRET": "s",
        "QPROXY_S3_BUCKET": "b",
    }
    result = subprocess.run(
        [sys.executable, "-m", "qproxy", "nginx-config", "--full", "--offload"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    conf = prefix / "nginx.conf"
    conf.write_text(result.stdout)
    checked = nginx_t(conf, prefix)
    assert checked.returncode == 0, checked.stderr


def test_an_old_command_line_with_micro_cache_listen_still_works() -> None:
    """X-Accel mode's micro-cache no longer has a second server to place: the option that
    placed it is taken, and changes nothing."""

    def run(*extra: str) -> str:
        return subprocess.run(
            [sys.executable, "-m", "qproxy", "nginx-config", "--micro-cache", *extra],
            capture_output=True, text=True, check=True,
            env={**os.environ, "QPROXY_LOCAL_ROOT": "/data/files"},
        ).stdout  # fmt: skip

    assert run("--micro-cache-listen", "unix:/run/nginx/qp-hop.sock") == run()
    assert "--micro-cache-listen" not in subprocess.run(
        [sys.executable, "-m", "qproxy", "nginx-config", "--help"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
