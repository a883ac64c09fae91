from __future__ import annotations

import re

import pytest

from qproxy.errors import InvalidKey
from qproxy.keys import MAX_KEY_BYTES, extension_of, generate_key, validate_key


@pytest.mark.parametrize(
    "key",
    ["a", "2026/11/26/abc.jpg", "x-y_z.tar.gz", "A" * MAX_KEY_BYTES],
)
def test_valid_keys(key: str) -> None:
    assert validate_key(key) == key


@pytest.mark.parametrize(
    "key",
    [
        "",
        "../etc/passwd",
        "a/../b",
        "a/./b",
        "..",
        "...",
        "/abs",
        "a//b",
        "a/",
        "a\x00b",
        "a b",
        "%2e%2e/x",
        "\u00fc",
        "a\r\nb",
        ".qp/journal/node.jsonl",
        "A" * (MAX_KEY_BYTES + 1),
    ],
)
def test_invalid_keys(key: str) -> None:
    with pytest.raises(InvalidKey):
        validate_key(key)


@pytest.mark.parametrize(
    "filename, ext",
    [
        ("photo.JPG", ".jpg"),
        ("../../etc/passwd", ""),
        ("a\r\nX-Accel-Redirect: /x.png", ".png"),
        ("", ""),
        (None, ""),
        ("x" * 10_000 + ".pdf", ".pdf"),
        ("\u00fcber.txt", ".txt"),
        ("archive.verylongextension", ""),
        (".bashrc", ""),
    ],
)
def test_generated_keys_are_safe(filename: str | None, ext: str) -> None:
    assert extension_of(filename) == ext
    key = generate_key(filename)
    assert validate_key(key) == key
    assert re.fullmatch(r"\d{4}/\d{2}/\d{2}/[A-Za-z0-9]{24}" + re.escape(ext), key)


def test_generated_keys_are_unique() -> None:
    assert len({generate_key("a.txt") for _ in range(2000)}) == 2000


def test_alternative_key_keeps_folder_and_extensions() -> None:
    from qproxy.keys import alternative_key

    one, two = alternative_key("a/b/photo.tar.gz"), alternative_key("a/b/photo.tar.gz")
    assert one != two
    assert re.fullmatch(r"a/b/photo_[A-Za-z0-9]{7}\.tar\.gz", one)
    assert re.fullmatch(r"\.env_[A-Za-z0-9]{7}", alternative_key(".env"))
