"""deploy/ agrees with itself and with qproxy: the systemd units pass systemd-analyze, the
nginx example is what the generator prints (and nginx -t takes it), Redis's include placed
last wins over Debian's redis.conf, the env file is valid, and the compose file runs
commands qproxy accepts from files that exist."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
import yaml

from qproxy.config import Config
from qproxy.dev.devstack import find_redis, free_port
from qproxy.ops.cli import build_parser
from qproxy.ops.nginx import find_nginx

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


def env_example() -> dict[str, str]:
    values = {}
    for line in (DEPLOY / "env.example").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    return values


def test_the_env_file_is_valid_settings() -> None:
    config = Config.from_env(env_example())
    assert config.node_url == "http://10.0.0.21:8300" and config.metrics_dir


def test_the_systemd_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing: `make test` installs systemd (apt)"
    # A root of its own: the units where systemd looks, the binary they start, and
    # systemd's own units (the targets they are ordered against).
    units = tmp_path / "etc" / "systemd" / "system"
    units.mkdir(parents=True)
    for unit in (DEPLOY / "systemd").glob("*.service"):
        shutil.copy(unit, units / unit.name)
    binary = tmp_path / "opt" / "qproxy" / "venv" / "bin" / "qproxy"
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    shutil.copytree(
        "/usr/lib/systemd/system", tmp_path / "usr" / "lib" / "systemd" / "system", symlinks=True
    )
    names = sorted(u.name for u in units.iterdir())
    assert names == ["qproxy-resolver.service", "qproxy-worker.service"]
    done = subprocess.run(
        [analyze, "verify", f"--root={tmp_path}", *names],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and done.stderr == "", done.stderr
    # Each unit runs a command qproxy takes.
    parser = build_parser()
    for unit in units.iterdir():
        lines = unit.read_text().splitlines()
        line = next(text for text in lines if text.startswith("ExecStart="))
        argv = shlex.split(line.removeprefix("ExecStart="))
        assert argv[0] == "/opt/qproxy/venv/bin/qproxy"
        parser.parse_known_args(argv[1:])


def test_the_nginx_example_is_what_nginx_config_prints(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QPROXY_")}
    printed = subprocess.run(
        [sys.executable, "-m", "qproxy", "nginx-config", "--listen", "80"],
        capture_output=True, text=True, timeout=60, env={**env, **env_example()}, check=True,
    ).stdout  # fmt: skip
    example = (DEPLOY / "nginx" / "qproxy.conf.example").read_text()
    assert printed == example, (
        "deploy/nginx/qproxy.conf.example is stale: regenerate it with "
        "`set -a; . deploy/env.example; qproxy nginx-config --listen 80`"
    )
    nginx = find_nginx()
    if nginx is None:
        pytest.skip("nginx is not installed")
    # As Debian includes conf.d/: inside http {}.
    (tmp_path / "logs").mkdir()
    (tmp_path / "nginx.conf").write_text(
        "events {}\nhttp {\n    include " + str(DEPLOY / "nginx" / "qproxy.conf.example") + ";\n}\n"
    )
    done = subprocess.run(
        [nginx, "-t", "-q", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"), "-e", "stderr"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("where", ["last", "first"])
def test_redis_takes_qproxy_conf_only_when_included_last(where: str, tmp_path: Path) -> None:
    debian = Path("/etc/redis/redis.conf")
    server = find_redis()
    if not debian.exists() or server is None:
        pytest.skip("Debian's redis-server is not installed")
    include = f"include {DEPLOY / 'redis' / 'qproxy.conf'}\n"
    text = debian.read_text()
    conf = tmp_path / "redis.conf"
    conf.write_text(text + "\n" + include if where == "last" else include + text)
    port = free_port()
    # The test's own address and files (command-line options come after the file).
    process = subprocess.Popen(
        [server, str(conf), "--port", str(port), "--bind", "127.0.0.1", "--daemonize", "no",
         "--dir", str(tmp_path), "--logfile", "", "--pidfile", str(tmp_path / "r.pid"),
         "--supervised", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    client = redis.Redis(port=port, password="change-me-to-a-long-random-password")
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert process.poll() is None and time.monotonic() < deadline
                time.sleep(0.1)
        appendonly = client.config_get("appendonly")["appendonly"]
        assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
        assert appendonly == ("yes" if where == "last" else "no")
    finally:
        client.close()
        process.terminate()
        process.wait(10)


def test_the_compose_file_builds_from_the_repository_and_runs_real_commands() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    parser = build_parser()
    built = 0
    for name, service in compose["services"].items():
        build = service.get("build")
        if build:
            context = (DEPLOY / build["context"]).resolve()
            dockerfile = context / build["dockerfile"]
            assert dockerfile.exists(), (name, dockerfile)
            for line in dockerfile.read_text().splitlines():
                if line.startswith("COPY "):
                    for source in line.split()[1:-1]:
                        assert (context / source).exists(), (name, source)
            built += 1
        command = service.get("command", [])
        text = " ".join(command)
        for part in text.split("&&"):
            argv = shlex.split(part.replace("sh -c ", "").split(">", 1)[0].strip())
            if argv and argv[0] == "qproxy":
                args, extra = parser.parse_known_args(argv[1:])
                assert not extra or getattr(args, "passthrough", False), (name, extra)
    assert built >= 4
