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
