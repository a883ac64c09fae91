from __future__ import annotations

import time

from qproxy.headers import check_signature, content_disposition, sign


def test_content_disposition_cannot_inject() -> None:
    value = content_disposition('evil"\r\nX-Accel-Redirect: /etc/passwd;.txt')
    assert "\r" not in value and "\n" not in value
    assert value.count('"') == 2
    assert value.startswith('inline; filename="evil')
    assert "filename*=UTF-8''evil%22%0D%0AX-Accel-Redirect%3A%20%2Fetc%2Fpasswd%3B.txt" in value


def test_content_disposition_unicode() -> None:
    assert content_disposition("\u00fcber.txt") == (
        "inline; filename=\"_ber.txt\"; filename*=UTF-8''%C3%BCber.txt"
    )
    assert content_disposition("") == "inline"


def test_signatures() -> None:
    exp = int(time.time()) + 60
    sig = sign("s", "a/b.txt", exp)
    assert check_signature("s", "a/b.txt", str(exp), sig)
    assert not check_signature("s", "a/c.txt", str(exp), sig)
    assert not check_signature("other", "a/b.txt", str(exp), sig)
    assert not check_signature("", "a/b.txt", str(exp), sign("", "a/b.txt", exp))
    old = int(time.time()) - 1
    assert not check_signature("s", "a/b.txt", str(old), sign("s", "a/b.txt", old))
    assert not check_signature("s", "a/b.txt", "soon", sig)
