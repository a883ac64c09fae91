from __future__ import annotations

from pathlib import Path

import pytest

from qproxy.config import Config
from qproxy.errors import ConfigError


def test_defaults_and_env() -> None:
    cfg = Config.from_env(
        {
            "QPROXY_S3_BUCKET": "b",
            "QPROXY_KEEP_LOCAL_SECONDS": "0",
            "QPROXY_MAX_UPLOAD_BYTES": "1024",
            "QPROXY_STANDALONE": "yes",
            "QPROXY_REDIS_URL": "redis://h:1/2",
        }
    )
    assert cfg.s3_bucket == "b"
    assert cfg.keep_local_seconds == 0.0
    assert cfg.max_upload_bytes == 1024
    assert cfg.standalone is True
    assert cfg.broker == "redis://h:1/2"  # the broker defaults to the Redis URL
    assert cfg.public_path == "/media/"
    assert cfg.redirect == "presigned"


def test_toml_file_then_env(tmp_path: Path) -> None:
    path = tmp_path / "qproxy.toml"
    path.write_text('[qproxy]\ns3_bucket = "from-file"\nnode_id = "n1"\nmax_parts = 7\n')
    cfg = Config.from_env({"QPROXY_CONFIG": str(path), "QPROXY_NODE_ID": "n2"})
    assert (cfg.s3_bucket, cfg.node_id, cfg.max_parts) == ("from-file", "n2", 7)


@pytest.mark.parametrize(
    "env, message",
    [
        ({"QPROXY_MAX_UPLOAD_BYTES": "lots"}, "QPROXY_MAX_UPLOAD_BYTES"),
        ({"QPROXY_PUBLIC_PATH": "media"}, "QPROXY_PUBLIC_PATH"),
        ({"QPROXY_REDIRECT": "cdn"}, "QPROXY_REDIRECT"),
        ({"QPROXY_REDIRECT": "public"}, "QPROXY_REMOTE_BASE_URL"),
        ({"QPROXY_STANDALONE": "perhaps"}, "QPROXY_STANDALONE"),
        ({"QPROXY_KEEP_LOCAL_SECONDS": "-1"}, "QPROXY_KEEP_LOCAL_SECONDS"),
        ({"QPROXY_S3_PREFIX": "../x"}, "QPROXY_S3_PREFIX"),
        ({"QPROXY_CONFIG": "/nonexistent/qproxy.toml"}, "QPROXY_CONFIG"),
    ],
)
def test_bad_settings_say_which(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Config.from_env(env)


def test_unknown_toml_setting(tmp_path: Path) -> None:
    path = tmp_path / "q.toml"
    path.write_text("bucket = 'x'\n")
    with pytest.raises(ConfigError, match="unknown setting 'bucket'"):
        Config.from_env({"QPROXY_CONFIG": str(path)})


def test_secret_masked() -> None:
    assert Config(secret="s3cr3t").describe()["secret"] == "***"


def test_framework_overrides_win() -> None:
    cfg = Config.from_env(
        {"QPROXY_S3_BUCKET": "env"}, overrides={"S3_BUCKET": "django", "qproxy_max_parts": "3"}
    )
    assert (cfg.s3_bucket, cfg.max_parts) == ("django", 3)
    with pytest.raises(ConfigError, match="unknown qproxy setting 'BUCKET'"):
        Config.from_env({}, overrides={"BUCKET": "x"})


BAD = [
    ("QPROXY_REDIS_URL", "localhost:6379", "no scheme"),
    ("QPROXY_REDIS_URL", "redis://127.0.0.1:notaport/0", "port is not a number"),
    ("QPROXY_REDIS_URL", "redis://127.0.0.1:70000/0", "port is not a number"),
    ("QPROXY_REDIS_URL", "redis://:hunter2@127.0.0.1:6379/x", "database 'x'"),
    ("QPROXY_REDIS_URL", "http://127.0.0.1:6379/0", "unknown scheme 'http'"),
    ("QPROXY_REDIS_URL", "redis+sentinel://a:1,b/m/0", "sentinel address 'b'"),
    ("QPROXY_BROKER_URL", "localhost:5672", "no scheme"),
    ("QPROXY_NODE_URL", "10.0.0.21:8300", "no scheme"),
    ("QPROXY_NODE_URL", "http://:8300", "no host"),
    ("QPROXY_S3_ENDPOINT_URL", "http://127.0.0.1:port", "port is not a number"),
    ("QPROXY_S3_ENDPOINT_URL", "s3.example.com", "no scheme"),
    ("QPROXY_REMOTE_BASE_URL", "ftp://cdn.example.com", "unknown scheme"),
    ("QPROXY_MAX_UPLOAD_BYTES", "10GB", "not a whole number"),
    ("QPROXY_JANITOR_INTERVAL", "soon", "not a number"),
    ("QPROXY_JANITOR_INTERVAL", "0", "must be positive"),
    ("QPROXY_TRANSFER_CONCURRENCY", "0", "at least 1"),
    ("QPROXY_MULTIPART_CHUNK", "1048576", "at least 5242880"),
    ("QPROXY_LOCAL_ROOT", "files", "absolute path"),
    ("QPROXY_NODE_ID", "web 1", "without spaces"),
]


@pytest.mark.parametrize("name, value, what", BAD, ids=[f"{n}={v}" for n, v, _ in BAD])
def test_a_bad_value_is_one_line_naming_it_with_an_example(
    name: str, value: str, what: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        Config.from_env({name: value})
    message = str(caught.value)
    assert message.startswith(name) and what in message, message
    assert "\n" not in message and "e.g." in message
    assert "hunter2" not in message  # a password is never printed


def test_good_urls_pass() -> None:
    for url in (
        "redis://127.0.0.1:6379/0",
        "rediss://:pw@cache.example.com:6380/2",
        "redis://localhost",
        "unix:///run/redis/redis.sock?db=0",
        "redis+sentinel://:pw@10.0.0.10:26379,10.0.0.11:26379/mymaster/0",
    ):
        assert Config.from_env({"QPROXY_REDIS_URL": url}).redis_url == url
    assert Config.from_env({"QPROXY_BROKER_URL": "amqp://guest@rabbit:5672//"}).broker_url
