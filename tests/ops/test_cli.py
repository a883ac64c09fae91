"""`qproxy --help` helps, and every subcommand has one."""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qproxy.compose import Stores
from qproxy.dev.devstack import Stack
from tests.conftest import wait_state


def qproxy(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qproxy", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_top_level_help_lists_commands() -> None:
    result = qproxy("--help")
    assert result.returncode == 0
    for command in (
        "resolver",
        "worker",
        "status",
        "ls",
        "put",
        "sweep",
        "retry",
        "delete",
        "reconcile",
        "nginx-config",
        "doctor",
        "demo",
    ):
        assert command in result.stdout
    assert "QPROXY_S3_BUCKET" in result.stdout


@pytest.mark.parametrize(
    "command, expected",
    [
        ("resolver", "--standalone"),
        ("worker", "passed to Celery"),
        ("status", "--json"),
        ("ls", "--state"),
        ("put", "paths of the files"),
        ("nginx-config", "--full"),
        ("demo", "--once"),
        ("sweep", "--stuck-after"),
        ("retry", "--all-failed"),
        ("sign", "binds the"),
        ("delete", "404 at once"),
        ("reconcile", "FLUSHALL"),
        ("doctor", "Exit status 1"),
        ("nginx-config", "--micro-cache"),
        ("nginx-config", "--peer-cache"),
        ("nginx-config", "--offload"),
    ],
)
def test_subcommand_help(command: str, expected: str) -> None:
    result = qproxy(command, "--help")
    assert result.returncode == 0, result.stderr
    assert expected in result.stdout
    assert f"usage: qproxy {command}" in result.stdout


def test_unknown_arguments_are_refused() -> None:
    result = qproxy("status", "k", "--bogus")
    assert result.returncode == 2
    assert "unrecognized arguments: --bogus" in result.stderr


def test_bad_configuration_is_one_clear_line() -> None:
    result = qproxy("status", "a.txt", env={"QPROXY_MAX_UPLOAD_BYTES": "many"})
    assert result.returncode == 2
    assert result.stderr.startswith("qproxy: QPROXY_MAX_UPLOAD_BYTES")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "url", ["localhost:6379", "redis://127.0.0.1:notaport/0"], ids=["no-scheme", "bad-port"]
)
def test_a_bad_redis_url_stops_every_command_with_one_line(url: str, tmp_path: Path) -> None:
    # Each said a traceback, tried RabbitMQ, or exited 0 (put) before.
    source = tmp_path / "a.txt"
    source.write_text("a")
    env = {"QPROXY_REDIS_URL": url, "QPROXY_S3_BUCKET": "b"}
    for args in (
        ["doctor"], ["ls"], ["status", "k"], ["sweep"], ["worker"], ["put", str(source)],
        ["resolver"], ["reconcile"], ["retry", "k"], ["delete", "k"], ["nodes"],
    ):  # fmt: skip
        result = qproxy(*args, env=env)
        said = result.stderr if args != ["doctor"] else result.stdout
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert "QPROXY_REDIS_URL=" in said and "e.g. redis://" in said, (args, said)
        assert "Traceback" not in result.stderr + result.stdout, args


def test_the_middlewares_refuse_bad_settings_when_made(monkeypatch: pytest.MonkeyPatch) -> None:
    from qproxy.asgi import UploadMiddleware as AsgiMiddleware
    from qproxy.errors import ConfigError
    from qproxy.wsgi import UploadMiddleware as WsgiMiddleware

    monkeypatch.setenv("QPROXY_REDIS_URL", "localhost:6379")
    for middleware in (WsgiMiddleware, AsgiMiddleware):
        with pytest.raises(ConfigError, match="QPROXY_REDIS_URL=localhost:6379: no scheme"):
            middleware(lambda *a: None)  # type: ignore[arg-type]


def test_worker_passes_arguments_to_celery() -> None:
    result = qproxy("worker", "--no-such-celery-option")
    assert result.returncode == 2
    assert "No such option '--no-such-celery-option'" in result.stderr
    assert "Traceback" not in result.stderr


def test_doctor_on_a_healthy_stack_and_a_broken_one(stack: Stack) -> None:
    import json

    import redis

    env = stack.env
    good = qproxy("doctor", "--json", env=env)
    assert good.returncode == 0, good.stdout + good.stderr
    levels = {c["name"]: c["level"] for c in json.loads(good.stdout)}
    for name in ("config", "secret", "local root", "redis", "s3", "workers"):
        assert levels[name] == "ok", (name, good.stdout)
    # nginx -t, on the config `qproxy nginx-config` prints.
    nginx = {c["name"]: c for c in json.loads(good.stdout)}["nginx"]
    assert nginx["level"] == "ok" and "nginx -t accepts" in nginx["detail"], nginx

    broken = qproxy(
        "doctor", "--check=s3", "--check=secret",
        env={**env, "QPROXY_S3_BUCKET": "no-such-bucket", "QPROXY_SECRET": ""},
    )  # fmt: skip
    assert broken.returncode == 1
    assert "FAIL  s3" in broken.stdout and "no-such-bucket" in broken.stdout
    assert "FAIL  secret" in broken.stdout

    client = redis.Redis.from_url(env["QPROXY_REDIS_URL"])
    client.config_set("maxmemory-policy", "allkeys-lru")
    try:
        evicting = qproxy("doctor", "--check=redis", env=env)
    finally:
        client.config_set("maxmemory-policy", "noeviction")
        client.close()
    assert evicting.returncode == 1 and "allkeys-lru" in evicting.stdout

    down = qproxy(
        "doctor", "--check=redis", env={**env, "QPROXY_REDIS_URL": "redis://127.0.0.1:1/0"}
    )
    assert down.returncode == 1 and "FAIL  redis" in down.stdout
    bad = qproxy("doctor", env={**env, "QPROXY_PUBLIC_PATH": "media"})
    assert bad.returncode == 2 and "FAIL  config" in bad.stdout


def test_doctor_check_names_are_the_doctors(stack: Stack) -> None:
    from qproxy.ops.cli import CHECK_NAMES
    from qproxy.ops.doctor import CHECKS

    assert [n.replace("-", " ") for n in CHECK_NAMES] == [name for name, _ in CHECKS]
    only = qproxy("doctor", "--json", "--check=secret", "--check=local-root", env=stack.env)
    assert [c["name"] for c in json.loads(only.stdout)] == ["config", "secret", "local root"]


def doctor_says(env: dict[str, str]) -> dict[str, dict[str, str]]:
    done = qproxy("doctor", "--json", env=env)
    assert "Traceback" not in done.stderr, done.stderr
    return {c["name"]: c for c in json.loads(done.stdout)}


def test_doctor_names_each_s3_problem_for_what_it_is(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    from qproxy.config import Config
    from qproxy.ops.doctor import check_s3

    env = stack.env
    assert check_s3(Config.from_env(env)).level == "ok"
    cases = {
        "endpoint": ({"QPROXY_S3_ENDPOINT_URL": "http://127.0.0.1:1"}, "cannot connect to the endpoint http://127.0.0.1:1"),
        "dns": ({"QPROXY_S3_ENDPOINT_URL": "http://no-such-host.invalid:9000"}, "cannot resolve the endpoint's host 'no-such-host.invalid' (DNS)"),
        "bucket": ({"QPROXY_S3_BUCKET": "no-such-bucket"}, "s3://no-such-bucket/: the bucket does not exist"),
        "no bucket": ({"QPROXY_S3_BUCKET": ""}, "QPROXY_S3_BUCKET is not set"),
        "credentials": (
            {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "AWS_SESSION_TOKEN": "",
             "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent",
             "AWS_EC2_METADATA_DISABLED": "true"},
            "no AWS credentials found",
        ),
    }  # fmt: skip
    for case, (changes, expected) in cases.items():
        with monkeypatch.context() as patched:
            for name, value in changes.items():
                if value:
                    patched.setenv(name, value)
                else:
                    patched.delenv(name, raising=False)
            found = check_s3(Config.from_env({**env, **changes}))
        assert found.level == "fail" and expected in found.detail, (case, found)
    # A missing bucket no longer stops the doctor: every other check runs.
    checks = doctor_says({**env, "QPROXY_S3_BUCKET": ""})
    assert checks["s3"]["level"] == "fail"
    assert {"secret", "redis", "broker", "workers", "node url", "nginx"} <= set(checks)


def test_doctor_says_redis_down_for_the_broker_too_and_hides_the_password(
    stack: Stack, tmp_path: Path
) -> None:
    root = tmp_path / "not-yet"
    env = {**stack.env, "QPROXY_REDIS_URL": "redis://:hunter2@127.0.0.1:1/0",
           "QPROXY_LOCAL_ROOT": str(root)}  # fmt: skip
    done = qproxy("doctor", "--json", env=env)
    assert done.returncode == 1
    assert "hunter2" not in done.stdout + done.stderr
    checks = {c["name"]: c for c in json.loads(done.stdout)}
    assert (
        checks["redis"]["level"] == "fail"
        and "redis://:***@127.0.0.1:1/0" in checks["redis"]["detail"]
    )
    assert (
        checks["broker"]["level"] == "fail" and "Connection refused" in checks["broker"]["detail"]
    )
    # A check changes nothing: the local root it was asked about is not made.
    assert (
        checks["local root"]["level"] == "warn"
        and "does not exist yet" in checks["local root"]["detail"]
    )
    assert not root.exists()


def test_a_check_that_hangs_fails_after_its_time_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    from qproxy.config import Config
    from qproxy.ops import doctor

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()  # accepts, never answers: a hung Redis
    port = listener.getsockname()[1]
    monkeypatch.setattr(doctor, "CHECK_SECONDS", 1.0)
    monkeypatch.setattr(doctor, "_redis", lambda url: doctor.redis_client(url, socket_timeout=30))
    config = Config(redis_url=f"redis://127.0.0.1:{port}/0", local_root="/tmp/x", s3_bucket="b")
    started = time.monotonic()
    (found,) = doctor._timed("redis", doctor.check_redis, config)
    assert time.monotonic() - started < 20  # (the hung Redis would hold it 30 s)
    assert found.level == "fail" and found.detail == "no answer within 1 s"
    listener.close()


def test_resolver_refuses_to_start_without_a_bucket() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QPROXY_")}
    result = subprocess.run(
        [sys.executable, "-m", "qproxy", "resolver", "--port", "1"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "qproxy: QPROXY_S3_BUCKET is not set: the resolver sends clients there once files reach S3"
    )


def test_sign_prints_a_url_the_resolver_accepts() -> None:
    from qproxy.config import Config
    from qproxy.headers import check_file_query

    env = {"QPROXY_SECRET": "cli-secret", "QPROXY_S3_BUCKET": "b"}
    result = qproxy("sign", "private/a.pdf", "--expires", "60", env=env)
    assert result.returncode == 0, result.stderr
    path, _, query = result.stdout.strip().partition("?")
    assert path == "/media/private/a.pdf"
    assert check_file_query("cli-secret", "private/a.pdf", query, method="GET")
    assert not check_file_query("cli-secret", "private/a.pdf", query, method="HEAD")
    assert Config(secret="cli-secret").public_path == "/media/"
    unsigned = qproxy("sign", "private/a.pdf", env={"QPROXY_SECRET": "", "QPROXY_S3_BUCKET": "b"})
    assert unsigned.returncode == 2
    assert "QPROXY_SECRET is not set" in unsigned.stderr


def test_put_with_a_taken_key_takes_another_and_replace_replaces(
    stack: Stack, tmp_path: Path
) -> None:
    # Eight `qproxy put --key` of one key at once (processes, as on several hosts): the name
    # is reserved before a byte is written, so each gets its own key and keeps its bytes.
    wanted = f"cli/{os.urandom(4).hex()}/report.pdf"
    sources = []
    for i in range(8):
        path = tmp_path / f"{i}.pdf"
        path.write_bytes(f"version {i} ".encode() * 1000)
        sources.append(path)
    env = {**os.environ, **stack.env}
    runs = [
        subprocess.Popen(
            [sys.executable, "-m", "qproxy", "put", str(p), "--key", wanted],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for p in sources
    ]
    keys = []
    for run in runs:
        out, err = run.communicate(timeout=60)
        assert run.returncode == 0, err
        keys.append(out.strip())
    assert len(set(keys)) == 8 and wanted in keys
    for key in keys:
        if key != wanted:
            assert re.fullmatch(r"cli/\w+/report_[A-Za-z0-9]{7}\.pdf", key), key
    node = Stores(stack.config)
    for path, key in zip(sources, keys, strict=True):
        wait_state(node, key, "remote")
        body = node.remote.open(node.state.get(key).object).read()  # type: ignore[union-attr]
        assert body == path.read_bytes()
    # A taken key is said on stderr; --replace makes a new version of it instead.
    again = qproxy("put", str(sources[0]), "--key", wanted, env=stack.env)
    assert again.returncode == 0 and again.stdout.strip() != wanted
    assert f"{wanted} exists" in again.stderr
    replaced = qproxy("put", str(sources[1]), "--key", wanted, "--replace", env=stack.env)
    assert replaced.returncode == 0 and replaced.stdout.strip() == wanted
    wait_state(node, wanted, "remote")
    record = node.state.get(wanted)
    assert record is not None and record.version == 2
    assert node.remote.open(record.object).read() == sources[1].read_bytes()
    assert qproxy("put", str(sources[0]), "--replace", env=stack.env).returncode == 2


def test_nodes_lists_registered_nodes_and_the_gone(stack: Stack) -> None:
    import time

    state = Stores(stack.config).state
    name = f"old-{os.urandom(3).hex()}"
    state.register_node(name, {"url": "http://10.9.9.9:8300", "seen": time.time() - 100})
    try:
        rows = {n["id"]: n for n in json.loads(qproxy("nodes", "--json", env=stack.env).stdout)}
        assert rows[name]["gone"] and rows[name]["url"] == "http://10.9.9.9:8300"
        # The stack's own resolver registered itself, and is up.
        assert rows["node-1"]["url"] == stack.env["QPROXY_NODE_URL"] and not rows["node-1"]["gone"]
        text = qproxy("nodes", env=stack.env).stdout
        assert re.search(rf"^{name} +http://10\.9\.9\.9:8300 +\d+s +gone$", text, re.M), text
    finally:
        state.deregister_node(name)


def test_nginx_config_names_the_registered_nodes_as_peers(stack: Stack) -> None:
    """--registered-peers: the other nodes `qproxy nodes` lists as up (draining ones too),
    each an upstream with kept-alive connections; not this node, not a gone one."""
    state = Stores(stack.config).state
    tag = os.urandom(3).hex()
    up, draining, gone = f"up-{tag}", f"draining-{tag}", f"gone-{tag}"
    state.register_node(up, {"url": "http://10.9.9.8:8300", "seen": time.time()})
    state.register_node(
        draining, {"url": "http://10.9.9.6:80", "seen": time.time(), "draining": True}
    )
    state.register_node(gone, {"url": "http://10.9.9.7:8300", "seen": time.time() - 100})
    try:
        out = qproxy("nginx-config", "--registered-peers", env=stack.env).stdout
        assert '"10.9.9.8:8300" qproxy_peer_' in out and "server 10.9.9.8:8300;" in out
        assert '"10.9.9.6:80" qproxy_peer_' in out
        assert "10.9.9.7" not in out
        own = stack.env["QPROXY_NODE_URL"].removeprefix("http://")
        assert f'"{own}"' not in out  # (this node's own files are local)
        # Redis away: one line and exit status 2, not a config without the peers.
        down = {**stack.env, "QPROXY_REDIS_URL": "redis://127.0.0.1:1/0"}
        failed = subprocess.run(
            [sys.executable, "-m", "qproxy", "nginx-config", "--registered-peers"],
            capture_output=True, text=True, env=down, timeout=60,
        )  # fmt: skip
        assert failed.returncode == 2 and failed.stdout == "", failed
        assert failed.stderr.startswith("qproxy: ") and "Traceback" not in failed.stderr
    finally:
        for name in (up, draining, gone):
            state.deregister_node(name)


def test_every_option_has_help_and_the_readme_summary_matches_it() -> None:
    from qproxy.ops.cli import build_parser

    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    summary = readme.split("## Command line", 1)[1].split("```", 2)[1]
    lines: dict[str, str] = {}
    current = ""
    for line in summary.splitlines():
        if line.startswith("qproxy "):
            current = line.split()[1]
            lines[current] = line
        elif current and line.startswith(" "):
            lines[current] += " " + line
    assert set(lines) == set(commands.choices), set(lines) ^ set(commands.choices)
    for name, sub in commands.choices.items():
        options = set()
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
                continue  # (a hidden option: still taken, from old command lines)
            assert action.help, f"qproxy {name}: {action.dest} has no help"
            options |= {o for o in action.option_strings if o.startswith("--")}
        said = set(re.findall(r"--[a-z][a-z-]*", lines[name]))
        assert said == options, f"qproxy {name}: README says {said}, --help has {options}"


def test_put_takes_several_files_and_refuses_what_is_not_one(stack: Stack, tmp_path: Path) -> None:
    files = []
    for i in range(3):
        path = tmp_path / f"part-{i}.txt"
        path.write_bytes(f"file {i}\n".encode() * 100)
        files.append(path)
    done = qproxy("put", *map(str, files), env=stack.env)
    assert done.returncode == 0, done.stderr
    keys = done.stdout.split()
    assert len(keys) == 3 and len(set(keys)) == 3
    node = Stores(stack.config)
    for key, path in zip(keys, files, strict=True):
        record = node.state.get(key)
        assert record is not None and record.filename == path.name
        assert record.size == path.stat().st_size
    assert done.stderr == ""  # no terminal: no progress bar
    # One line, exit 2, and nothing stored when one of them is not a file.
    before = len(node.state.keys_in_state("local")) + len(node.state.keys_in_state("queued"))
    missing = qproxy("put", str(files[0]), str(tmp_path / "nope.bin"), env=stack.env)
    assert missing.returncode == 2 and missing.stdout == ""
    assert missing.stderr == f"qproxy put: {tmp_path / 'nope.bin'}: no such file\n"
    folder = qproxy("put", str(tmp_path), env=stack.env)
    assert folder.returncode == 2
    assert folder.stderr == f"qproxy put: {tmp_path} is a folder: give the files in it\n"
    after = len(node.state.keys_in_state("local")) + len(node.state.keys_in_state("queued"))
    assert after <= before  # (the worker may have moved some on meanwhile, never added)


def test_put_shows_a_progress_bar_on_a_terminal(stack: Stack, tmp_path: Path) -> None:
    import fcntl
    import pty
    import struct
    import termios

    path = tmp_path / "big.bin"
    path.write_bytes(os.urandom(4 * 1024 * 1024))
    leader, follower = pty.openpty()
    # A terminal 100 columns wide (a new pty has none: the bar would have no room).
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    done = subprocess.run(
        [sys.executable, "-m", "qproxy", "put", str(path)],
        stdout=subprocess.PIPE,
        stderr=follower,
        text=True,
        timeout=60,
        env={**os.environ, **stack.env},
    )
    os.close(follower)
    shown = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:
            break
        if not chunk:
            break
        shown += chunk
    os.close(leader)
    assert done.returncode == 0 and done.stdout.strip()
    text = shown.decode(errors="replace")
    # The name, how far, the size, the rate and the time left (tqdm's bar).
    assert "big.bin" in text and "100%" in text and "4.00M/4.00M" in text, text
    assert "B/s" in text and "<00:00" in text, text


def test_status_and_delete_take_a_files_url(stack: Stack, tmp_path: Path) -> None:
    path = tmp_path / "by url.txt"
    path.write_text("by url\n")
    key = qproxy("put", str(path), env=stack.env).stdout.strip()
    for given in (f"/media/{key}", f"https://files.example.com/media/{key}?exp=1&sig=x", key):
        shown = qproxy("status", given, "--json", env=stack.env)
        assert shown.returncode == 0, shown.stderr
        assert json.loads(shown.stdout)["key"] == key
    gone = qproxy("delete", f"http://127.0.0.1/media/{key}", env=stack.env)
    assert gone.returncode == 0 and f"deleted {key}" in gone.stdout


def test_ls_has_a_header_newest_first_and_filters(stack: Stack, tmp_path: Path) -> None:
    names = []
    for i in range(3):
        path = tmp_path / f"listed-{i}.txt"
        path.write_text(f"listed {i}\n")
        qproxy("put", str(path), env=stack.env)
        names.append(path.name)
        time.sleep(0.01)  # (distinct creation times)
    listed = qproxy("ls", "--limit", "2", env=stack.env)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split() == ["STATE", "SIZE", "AGE", "NODE", "FILENAME", "KEY"]
    assert len(lines) == 3  # the header and --limit 2
    assert names[2] in lines[1] and names[1] in lines[2]  # newest first
    assert re.search(r"\s\d+s\s+node-1\s", lines[1]), lines[1]
    assert qproxy("ls", "--node", "elsewhere", env=stack.env).stdout.splitlines()[1:] == []
