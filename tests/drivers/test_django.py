"""The Django storage: a real project (SQLite), real worker, Redis, moto and nginx."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from PIL import Image

from qproxy.compose import Stores
from qproxy.dev.devstack import Stack
from qproxy.worker.sweep import drop_local_copies
from tests.conftest import _stack

SETTINGS = "tests.djangoproject.settings"


@pytest.fixture(scope="module")
def django_stack() -> Iterator[Stack]:
    folder = Path(tempfile.mkdtemp(prefix="qproxy-django-"))
    env = {
        "DJANGO_SETTINGS_MODULE": SETTINGS,
        "QP_DJANGO_DB": str(folder / "db.sqlite3"),
        # The signal django-queued-storage users know, sent from the worker's hook; the
        # gallery app's receiver marks the photo (tests/djangoproject/gallery/apps.py).
        "QPROXY_ON_TRANSFERRED": "qproxy.contrib.django.send_file_transferred",
    }
    try:
        with _stack(app="tests.djangoproject.wsgi:application", **env) as stack:
            subprocess.run(
                [sys.executable, "-m", "django", "migrate", "--noinput"],
                env={**os.environ, **stack.env},
                check=True,
                capture_output=True,
            )
            yield stack
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 90)).save(out, "PNG")
    return out.getvalue()


def wait(predicate: Any, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.2)


def test_create_serve_transfer_delete(django_stack: Stack) -> None:
    stack = django_stack
    image = png(64, 48)
    with httpx.Client(base_url=stack.front, timeout=30) as client:
        page = client.get("/photos/new")
        assert page.status_code == 200
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text)
        assert token
        created = client.post(
            "/photos/new",
            data={"title": "Sunset", "csrfmiddlewaretoken": token.group(1)},
            files={
                "image": ("sunset.png", image, "image/png"),
                "attachment": ("notes.txt", b"hello notes", "text/plain"),
            },
        )
        assert created.status_code == 302, created.text
        detail_url = created.headers["location"]
        info = client.get(detail_url).json()
        assert info["title"] == "Sunset"
        assert (info["width"], info["height"]) == (64, 48)
        assert (
            info["image"].startswith("photos/sunset")
            and info["image_url"] == "/media/" + info["image"]
        )
        assert info["attachment_text"] == "hello notes"  # read back through the storage

        # Served through nginx from wherever the file is (local now or already remote).
        served = client.get(info["image_url"], follow_redirects=True)
        assert served.status_code == 200 and served.content == image

        # Transferred by the real worker; the hook marks the model without polling.
        wait(lambda: client.get(detail_url).json()["image_in_s3"])
        info = client.get(detail_url).json()
        assert info["image_remote"] and not info["image_local"]
        remote = client.get(info["image_url"])
        assert remote.status_code == 302
        assert httpx.get(remote.headers["location"]).content == image

        # The attachment's storage is delayed: it stays local until transfer() is called.
        node = Stores(stack.config)
        record = node.state.get(info["attachment"])
        assert record is not None and record.state == "local"

        # Deleted: 404 at once, then every copy and the record go.
        assert client.post(detail_url.replace(".json", "/delete")).status_code == 204
        assert client.get(info["image_url"]).status_code == 404
        s3 = boto3.client("s3", endpoint_url=stack.url("s3"), region_name="us-east-1")
        wait(
            lambda: (
                s3.list_objects_v2(Bucket="qproxy-dev", Prefix=info["image"]).get("KeyCount") == 0
            )
        )
        wait(lambda: node.state.get(info["image"]) is None)
        assert not node.local.exists(info["image"])
        wait(
            lambda: (
                not node.local.exists(info["attachment"])
                and node.state.get(info["attachment"]) is None
            )
        )


def test_makemigrations_check() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "django", "makemigrations", "--check", "--dry-run"],
        env={**os.environ, "DJANGO_SETTINGS_MODULE": SETTINGS},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "No changes detected" in result.stdout


# -- the Storage API, in this process -------------------------------------------------------


@pytest.fixture(scope="module")
def storage_options(stack: Stack) -> dict[str, str]:
    from django.conf import settings

    options = {
        k.removeprefix("QPROXY_").lower(): v
        for k, v in stack.env.items()
        if k.startswith("QPROXY_")
    }
    # The stack's settings as a project gives them: settings.QPROXY (which the worker and
    # the resolver read too, with DJANGO_SETTINGS_MODULE set).
    if not settings.configured:
        settings.configure(USE_TZ=True, QPROXY=options)
    import django

    django.setup()
    return options


def make_storage(options: dict[str, str], **extra: Any) -> Any:
    from qproxy.contrib.django import QueuedStorage

    return QueuedStorage(**extra)


def test_storage_api(stack: Stack, storage_options: dict[str, str]) -> None:
    from django.core.files.base import ContentFile

    from qproxy.contrib.django import attach_meta

    storage = make_storage(storage_options)
    data = os.urandom(70_000)
    name = storage.save(
        "reports/R\u00e9sum\u00e9 2026.pdf", attach_meta(ContentFile(data), owner=7)
    )
    assert name == "reports/Resume_2026.pdf"
    assert storage.exists(name) and storage.size(name) == len(data)
    assert storage.url(name) == "/media/reports/Resume_2026.pdf"
    with storage.open(name) as fh:
        assert fh.read() == data
    # Never the same name twice, locally or remotely.
    again = storage.save("reports/R\u00e9sum\u00e9 2026.pdf", ContentFile(b"other"))
    assert again != name and again.startswith("reports/Resume_2026_")
    # Local now, or already remote if the worker was quick (delayed storage: see below).
    assert storage.stores.state.get(name).state in ("local", "queued", "transferring", "remote")
    assert storage.wait_remote(name)
    node = storage.stores
    record = node.state.get(name)
    assert (
        record is not None
        and record.meta == {"owner": 7}
        and record.content_type == "application/pdf"
    )
    # The local copy gone, open() streams from S3.
    drop_local_copies(node, now=time.time() + 3601)
    assert not node.local.exists(name)
    with storage.open(name) as fh:
        assert fh.read() == data
    assert storage.get_modified_time(name).tzinfo is not None
    old_object = record.object
    storage.delete(name)
    # Gone at once for Django, as after FileSystemStorage.delete(); the S3 copy goes in the
    # background.
    assert not storage.exists(name)
    with pytest.raises(FileNotFoundError):
        storage.open(name)
    # The name is free again: a new version, its own S3 object, which the old one's purge
    # does not touch.
    fresh = os.urandom(5000)
    assert storage.save(name, ContentFile(fresh)) == name
    assert storage.wait_remote(name)
    new_object = node.state.get(name).object
    assert new_object != old_object
    s3 = node.remote
    wait(lambda: s3.head(old_object) is None)
    drop_local_copies(node, now=time.time() + 3601)
    assert not node.local.exists(name)
    with storage.open(name) as fh:
        assert fh.read() == fresh  # its versioned object, not the key's first one
    storage.delete(name)
    wait(lambda: s3.head(new_object) is None and node.state.get(name) is None)


def test_delayed_storage_transfers_on_demand(storage_options: dict[str, str]) -> None:
    from django.core.files.base import ContentFile

    storage = make_storage(storage_options, delayed=True)
    name = storage.save("later.txt", ContentFile(b"later"))
    time.sleep(1)
    assert storage.using_local(name) and storage.stores.state.get(name).state == "local"
    assert storage.transfer(name)
    assert storage.wait_remote(name)
    assert not storage.transfer(name)  # nothing left to do


def test_deconstruct_for_migrations() -> None:
    from qproxy.contrib.django import QueuedStorage

    path, args, kwargs = QueuedStorage(delayed=True, keep_local_seconds=60).deconstruct()
    assert path == "qproxy.contrib.django.QueuedStorage"
    assert args == () and kwargs == {"delayed": True, "keep_local_seconds": 60}


# -- Django's storage contract (issue: text, races, names, times, long names) ----------------


def test_text_content_is_stored_as_utf8(storage_options: dict[str, str], tmp_path: Path) -> None:
    from django.core.files.base import ContentFile, File

    storage = make_storage(storage_options)
    name = storage.save("notes/hello.txt", ContentFile("grüße\n"))
    with storage.open(name) as fh:
        assert fh.read() == "grüße\n".encode()
    text_file = tmp_path / "t.txt"
    text_file.write_text("line one\nline two\n", encoding="utf-8")
    with open(text_file, encoding="utf-8") as fh:
        other = storage.save("notes/from-text-mode.txt", File(fh))
    with storage.open(other) as fh:
        assert fh.read() == b"line one\nline two\n"
    with storage.open(storage.save("notes/io.txt", File(io.StringIO("io text")))) as fh:
        assert fh.read() == b"io text"


def _save_many(options: dict[str, str], count: int) -> list[tuple[str, str]]:
    """Threads of one process saving one name at once: (name, sha256 of what each saved)."""
    import hashlib
    from concurrent.futures import ThreadPoolExecutor

    from django.core.files.base import ContentFile

    storage = make_storage(options)

    def one(i: int) -> tuple[str, str]:
        data = os.urandom(20_000) + str(i).encode()
        return storage.save("race/same.bin", ContentFile(data)), hashlib.sha256(data).hexdigest()

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


RACE_CHILD = """
import json, os, sys
import django
from django.conf import settings
settings.configure(USE_TZ=True, QPROXY=json.loads(sys.argv[1]))
django.setup()
from tests.drivers.test_django import _save_many
print(json.dumps(_save_many(json.loads(sys.argv[1]), 20)))
"""


def test_concurrent_saves_of_one_name_get_distinct_names(
    stack: Stack, storage_options: dict[str, str]
) -> None:
    import hashlib
    import json

    children = [
        subprocess.Popen(
            [sys.executable, "-c", RACE_CHILD, json.dumps(storage_options)],
            stdout=subprocess.PIPE,
            env={**os.environ, **stack.env, "PYTHONPATH": str(Path(__file__).parents[2])},
        )
        for _ in range(2)
    ]
    saved = [pair for child in children for pair in json.loads(child.communicate(timeout=120)[0])]
    assert all(child.returncode == 0 for child in children)
    names = [name for name, _ in saved]
    assert len(saved) == 40 and len(set(names)) == 40
    storage = make_storage(storage_options)
    s3 = boto3.client("s3", endpoint_url=stack.url("s3"), region_name="us-east-1")
    for name, sha in saved:
        assert storage.wait_remote(name), name
        body = s3.get_object(Bucket="qproxy-dev", Key=name)["Body"].read()
        assert hashlib.sha256(body).hexdigest() == sha, name
        assert storage.stores.state.get(name).sha256 == sha


@pytest.mark.parametrize("bad", ["../x.txt", "/etc/passwd", "a/../../b.txt", ".."])
def test_suspicious_names_are_refused_as_django_refuses_them(
    storage_options: dict[str, str], bad: str
) -> None:
    from django.core.exceptions import SuspiciousFileOperation

    storage = make_storage(storage_options)
    for call in (storage.exists, storage.delete, storage.get_available_name):
        with pytest.raises(SuspiciousFileOperation):
            call(bad)


def test_names_behave_as_djangos_storages_do(storage_options: dict[str, str]) -> None:
    from django.core.exceptions import SuspiciousFileOperation
    from django.core.files.base import ContentFile

    storage = make_storage(storage_options)
    for empty in (None, ""):
        with pytest.raises(ValueError, match="name must be given"):
            storage.delete(empty)
    with pytest.raises(SuspiciousFileOperation):
        storage.get_valid_name("???")
    name = storage.save(Path("paths") / "as-path.txt", ContentFile(b"pathlib"))
    assert name == "paths/as-path.txt" and storage.exists(Path(name))
    # A file opened from the storage opens again (a FieldFile reopens it) from the storage,
    # not from a same-named file in the working directory.
    fh = storage.open(name)
    fh.close()
    fh.open()
    assert fh.read() == b"pathlib"
    fh.close()


def test_long_names_keep_their_extension(storage_options: dict[str, str]) -> None:
    from django.core.files.base import ContentFile

    storage = make_storage(storage_options)
    long = "docs/" + "x" * 300 + ".pdf"
    name = storage.save(long, ContentFile(b"%PDF"), max_length=100)
    assert len(name) <= 100 and name.endswith(".pdf")
    assert storage.stores.state.get(name).content_type == "application/pdf"


def test_storages_with_the_same_settings_share_their_clients(
    storage_options: dict[str, str],
) -> None:
    """A storage per field (or per test) does not build its own Redis pool and S3 client on
    its first call: same settings, same clients; other settings, their own."""
    from django.core.files.base import ContentFile

    first, second = make_storage(storage_options), make_storage(storage_options)
    name = first.save("shared/a.txt", ContentFile(b"a"))
    assert second.exists(name)
    assert second.stores is first.stores
    assert second.stores.remote.client is first.stores.remote.client
    assert second.stores.state.redis is first.stores.state.redis
    other = make_storage(storage_options, keep_local_seconds=0)
    assert other.stores is not first.stores
    assert other.stores.config.keep_local_seconds == 0


def test_times_follow_use_tz(storage_options: dict[str, str]) -> None:
    from django.core.files.base import ContentFile
    from django.test import override_settings

    storage = make_storage(storage_options)
    name = storage.save("times/t.txt", ContentFile(b"t"))
    assert storage.get_modified_time(name).tzinfo is not None
    with override_settings(USE_TZ=False):
        naive = storage.get_modified_time(name)
        assert naive.tzinfo is None
        import datetime

        assert abs((datetime.datetime.now() - naive).total_seconds()) < 120


def test_per_storage_options_hold_in_the_worker_too(
    stack: Stack, storage_options: dict[str, str]
) -> None:
    from django.core.files.base import ContentFile

    from qproxy.config import Config
    from qproxy.errors import ConfigError

    # Carried by each file's record: the worker drops the local copy at once (after the
    # short grace), whatever its own QPROXY_KEEP_LOCAL_SECONDS.
    storage = make_storage(storage_options, keep_local_seconds=0)
    name = storage.save("keep/zero.bin", ContentFile(b"drop me soon"))
    assert storage.wait_remote(name)
    record = storage.stores.state.get(name)
    assert record.keep == 0.0
    grace = Config().drop_grace_seconds
    drop_local_copies(storage.stores, now=time.time() + grace + 1)
    assert not storage.stores.local.exists(name)
    with storage.open(name) as fh:
        assert fh.read() == b"drop me soon"  # from S3 now
    # What the worker and the resolver would not know is refused, naming the option.
    with pytest.raises(ConfigError, match=r"QueuedStorage\(s3_prefix=\.\.\.\)"):
        make_storage(storage_options, s3_prefix="img/")


def test_the_worker_reads_settings_qproxy(tmp_path: Path) -> None:
    # With DJANGO_SETTINGS_MODULE set, every process (worker, resolver, qproxy CLI) takes
    # settings.QPROXY over the environment, as the web process does.
    (tmp_path / "qp_settings.py").write_text('QPROXY = {"S3_PREFIX": "from-django/"}\n')
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "qp_settings",
        "PYTHONPATH": f"{tmp_path}:{Path(__file__).parents[2]}",
        "QPROXY_S3_PREFIX": "from-env/",
    }
    code = "from qproxy.config import Config; print(Config.from_env().s3_prefix)"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.stdout.strip() == "from-django/", out.stderr


def test_the_storages_setting_builds_it(storage_options: dict[str, str]) -> None:
    from django.core.files.base import ContentFile
    from django.core.files.storage import default_storage, storages
    from django.test import override_settings

    from qproxy.contrib.django import QueuedStorage

    backend = {
        "BACKEND": "qproxy.contrib.django.QueuedStorage",
        "OPTIONS": {"delayed": True, "keep_local_seconds": 120},
    }
    with override_settings(STORAGES={"default": backend}):
        storage = storages["default"]
        assert isinstance(storage, QueuedStorage) and storage.delayed
        name = default_storage.save("storages/setting.txt", ContentFile(b"via STORAGES"))
        record = storage.stores.state.get(name)
        assert record.state == "local" and record.hold and record.keep == 120.0


STATIC_SETTINGS = """
SECRET_KEY = "static"
INSTALLED_APPS = ["django.contrib.staticfiles"]
STATIC_URL = "/static/"
STATICFILES_DIRS = [{src!r}]
USE_TZ = True
STORAGES = {{
    "default": {{"BACKEND": "qproxy.contrib.django.QueuedStorage"}},
    "staticfiles": {{
        "BACKEND": "tests.djangoproject.staticstorage.QueuedManifestStorage",
        "OPTIONS": {{"allow_overwrite": True}},
    }},
}}
"""


def test_as_a_staticfiles_storage_with_a_manifest(
    stack: Stack, storage_options: dict[str, str], tmp_path: Path
) -> None:
    """collectstatic overwrites changed files in place, keeps its manifest, and --clear
    clears what it listed (listdir)."""
    from qproxy.contrib.django import QueuedStorage

    src = tmp_path / "src"
    (src / "css").mkdir(parents=True)
    prefix = f"static-{os.urandom(4).hex()}/"
    (tmp_path / "static_settings.py").write_text(STATIC_SETTINGS.format(src=str(src)))
    env = {
        **os.environ,
        **stack.env,
        "QPROXY_S3_PREFIX": "",
        "DJANGO_SETTINGS_MODULE": "static_settings",
        "PYTHONPATH": f"{tmp_path}:{Path(__file__).parents[2]}",
    }

    def collectstatic(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "django", "collectstatic", "--noinput", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    storage = QueuedStorage()
    css = src / "css" / "site.css"
    css.write_text("body { color: red }")
    collectstatic()
    dirs, names = storage.listdir("css")
    assert "site.css" in names and dirs == []
    hashed = [n for n in names if n.startswith("site.") and n != "site.css"]
    assert len(hashed) == 1
    time.sleep(1.1)  # a newer source file (collectstatic compares modification times)
    css.write_text("body { color: blue }")
    os.utime(css)
    collectstatic()
    dirs, names = storage.listdir("css")
    # Overwritten in place: no site_XXXXXXX.css beside it, and the new bytes under the name.
    assert [n for n in names if n.startswith("site_")] == []
    with storage.open("css/site.css") as fh:
        assert fh.read() == b"body { color: blue }"
    assert "staticfiles.json" in storage.listdir("")[1]
    collectstatic("--clear")  # clears, then collects again
    del prefix
