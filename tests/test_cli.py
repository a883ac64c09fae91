"""`qproxy --help` helps, and every subcommand has one."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


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
        ("put", "path of the file"),
        ("nginx-config", "--full"),
        ("demo", "--once"),
        ("sweep", "--stuck-after"),
        ("retry", "--all-failed"),
        ("delete", "404 at once"),
        ("reconcile", "FLUSHALL"),
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


def test_worker_passes_arguments_to_celery() -> None:
    result = qproxy("worker", "--no-such-celery-option")
    assert result.returncode == 2
    assert "No such option '--no-such-celery-option'" in result.stderr
    assert "Traceback" not in result.stderr
