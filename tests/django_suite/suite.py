"""Django's own ``tests/file_storage`` suite, pointed at QueuedStorage.

The test classes are Django's, imported from the sdist of the Django installed
(:mod:`tests.django_suite.fetch`); each is subclassed here with a ``setUp`` that gives it a
QueuedStorage on a real stack (Redis, moto's S3, a Celery worker), emptied before every
test, where Django's gives it a ``FileSystemStorage`` on a fresh temporary folder.
``self.temp_dir`` is the node's local root, where a saved file lies until the janitor drops
it, so Django's ``os.path.exists`` checks of saved files hold as written.

A few tests are adapted (their filesystem-only lines said through the Storage API); the rest
run as Django wrote them. The tests that do not apply to a storage without a filesystem path
are listed in ``NOT_APPLICABLE`` with the reason, and reported as skipped with it.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Callable
from typing import Any, ClassVar
from unittest import mock, skip

from django.core.files.base import ContentFile
from django.db.models import FileField
from file_storage import models, test_base, test_generate_filename, test_inmemory_storage
from file_storage import tests as django_tests

from qproxy.compose import Stores
from qproxy.config import Config
from qproxy.contrib.django import QueuedStorage
from qproxy.stores.local import PRIVATE

NO_PATH = "not applicable: QueuedStorage has no path() (files move to S3; open() them)"
NO_LOCATION = (
    "not applicable: QueuedStorage has no location (the node's local root is a qproxy "
    "setting every process shares, not a per-storage argument)"
)
NOT_APPLICABLE: dict[str, str] = {
    # FileStorageTests and its subclasses
    "FileStorageTests.test_empty_location": NO_LOCATION,
    "FileStorageTests.test_setting_changed": NO_LOCATION + " and no permission modes",
    "FileStorageTests.test_delete_deletes_directories": NO_LOCATION
    + "; folders are not stored objects",
    "FileStorageTests.test_file_storage_preserves_filename_case": NO_LOCATION + "; " + NO_PATH,
    "FileStorageTests.test_file_get_accessed_time": NO_PATH + "; the times are the record's",
    "FileStorageTests.test_file_get_created_time": NO_PATH + "; the times are the record's",
    "FileStorageTests.test_file_get_modified_time": NO_PATH + "; the times are the record's",
    "FileStorageTests.test_file_path": NO_PATH,
    "FileStorageTests.test_file_methods_pathlib_path": NO_PATH
    + " (the rest: tests/drivers/test_django.py)",
    "FileStorageTests.test_makedirs_race_handling": (
        "not applicable: folders are made with mkdir relative to O_NOFOLLOW directory "
        "descriptors (no symlink is followed), not os.makedirs, which the test patches"
    ),
    "FileStorageTests.test_remove_race_handling": (
        "not applicable: copies are removed by the worker and the janitor, not by "
        "os.remove in delete(), which the test patches"
    ),
    "FileStorageTests.test_listdir": (
        "not applicable: an empty folder made with os.mkdir on one node's disk is not a "
        "stored name; folders exist as prefixes of stored names (MemoryStorageIOTests."
        "test_listdir runs)"
    ),
    # OverwritingStorage masks O_EXCL in FileSystemStorage.OS_OPEN_FLAGS (deprecated in
    # Django 5.1): a FileSystemStorage knob. allow_overwrite=True is tested instead.
    "OverwritingStorageOSOpenFlagsWarningTests.test_os_open_flags_deprecation_warning": "not applicable: FileSystemStorage.OS_OPEN_FLAGS",
    # FileFieldStorageTests
    "FileFieldStorageTests.test_extended_length_storage": (
        "not applicable: asks the filesystem for NAME_MAX through storage.location; "
        "QueuedStorage keeps a name segment to 200 characters (the local disk's 255 bytes, "
        "less room for the suffix get_available_name adds)"
    ),
    "FileFieldStorageTests.test_create_file_field_from_another_file_field_in_memory_storage": (
        "not applicable: about InMemoryStorage as the default storage"
    ),
    # InMemoryStorage's suite
    "MemoryStorageIOTests.test_open_dir_as_file": (
        "not applicable: a folder is a prefix of stored names, not a node that open() meets"
    ),
    "MemoryStorageIOTests.test_file_node_cannot_have_children": (
        "not applicable: S3 allows a key and a prefix of the same name (a/b and a/b/c)"
    ),
    "MemoryStorageIOTests.test_removing_temporary_file_after_save": (
        "not applicable: QueuedStorage copies an upload's temporary file (it must stay "
        "usable by the app: Django's test_save_doesnt_close), it does not move it"
    ),
    "MemoryStorageIOTests.test_delete": (
        "not applicable: delete() of a folder; QueuedStorage deletes stored names only"
    ),
}

_stores: Stores | None = None


def stores() -> Stores:
    global _stores
    if _stores is None:
        _stores = Stores(Config.from_env())
    return _stores


def empty_the_stack() -> None:
    """What a fresh temporary folder is to Django's tests: no record, no local file, no
    S3 object."""
    node = stores()
    redis = node.state.redis
    for name in list(redis.scan_iter(match=node.state.prefix + "*", count=1000)):
        redis.delete(name)
    root = node.config.local_root
    for entry in os.scandir(root):
        if entry.name == PRIVATE:
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            os.unlink(entry.path)
    for key in list(node.remote.list_keys()):
        node.remote.delete(key)


def not_applicable(cls: type) -> type:
    """Report Django's tests that do not apply as skipped, with the reason (keyed by the
    Django class that defines the test)."""
    for name in dir(cls):
        owner = next((k for k in cls.__mro__ if name in vars(k)), None)
        reason = NOT_APPLICABLE.get(f"{owner.__name__}.{name}") if owner else None
        if reason is not None:
            setattr(cls, name, skip(reason)(getattr(cls, name)))
    return cls


class QueuedSetup:
    """A QueuedStorage on an emptied stack where Django's setUp makes a FileSystemStorage."""

    storage_factory: Callable[..., QueuedStorage] = QueuedStorage
    storage_options: ClassVar[dict[str, Any]] = {}

    def setUp(self) -> None:
        empty_the_stack()
        self.temp_dir = self.storage_dir = str(stores().config.local_root)
        self.storage = self.storage_factory(base_url="/test_media_url/", **self.storage_options)

    def storage_class(self, **kwargs: Any) -> QueuedStorage:  # Django's tests make more
        kwargs.pop("location", None)
        return self.storage_factory(**kwargs)


# -- tests.py ---------------------------------------------------------------------------------


@not_applicable
class QueuedStorageTests(QueuedSetup, django_tests.FileStorageTests):  # type: ignore[misc]
    pass


class CustomQueuedStorage(QueuedStorage):
    get_available_name = django_tests.CustomStorage.get_available_name


@not_applicable
class CustomQueuedStorageTests(QueuedSetup, django_tests.CustomStorageTests):  # type: ignore[misc]
    storage_factory = CustomQueuedStorage


@not_applicable
class OverwritingQueuedStorageTests(QueuedSetup, django_tests.OverwritingStorageTests):  # type: ignore[misc]
    storage_options: ClassVar[dict[str, Any]] = {"allow_overwrite": True}


class DiscardingFalseContentQueuedStorage(QueuedStorage):
    # As Django's DiscardingFalseContentStorage, over QueuedStorage.
    def _save(self, name: str, content: Any) -> str:
        if content:
            return super()._save(name, content)
        return ""


@not_applicable
class DiscardingFalseContentQueuedStorageTests(  # type: ignore[misc]
    QueuedSetup, django_tests.DiscardingFalseContentStorageTests
):
    storage_factory = DiscardingFalseContentQueuedStorage


class ValidNameQueuedStorage(QueuedStorage):
    get_valid_name = models.CustomValidNameStorage.get_valid_name


@not_applicable
class QueuedFileFieldStorageTests(django_tests.FileFieldStorageTests):  # type: ignore[misc]
    """Django's FileField tests with every field of their model on QueuedStorage."""

    def setUp(self) -> None:
        empty_the_stack()
        queued = QueuedStorage()
        patches = [mock.patch.object(django_tests, "temp_storage", queued)]
        for field in models.Storage._meta.get_fields():
            if not isinstance(field, FileField):
                continue
            if field.storage is models.temp_storage:
                patches.append(mock.patch.object(field, "storage", queued))
            elif isinstance(field.storage, models.CustomValidNameStorage):
                patches.append(mock.patch.object(field, "storage", ValidNameQueuedStorage()))
        for patch in patches:
            patch.start()
            self.addCleanup(patch.stop)

    def test_file_object(self) -> None:
        # Adapted: Django opens the saved file by its path (temp_storage.path()); here it is
        # opened through the storage, the rest as written.
        temp_storage = django_tests.temp_storage
        temp_storage.save("tests/example.txt", ContentFile("some content"))
        with temp_storage.open("tests/example.txt", "r") as file_obj:
            temp_storage.save("tests/file_obj", file_obj)
        self.assertTrue(temp_storage.exists("tests/file_obj"))
        with temp_storage.open("tests/file_obj") as f:
            self.assertEqual(f.read(), b"some content")


class QueuedFileSaveRaceConditionTest(QueuedSetup, django_tests.FileSaveRaceConditionTest):  # type: ignore[misc]
    def setUp(self) -> None:
        super().setUp()
        self.thread = threading.Thread(target=self.save_file, args=["conflict"])

    def test_race_condition(self) -> None:
        # Adapted: the names are listed through the storage (the local root also holds
        # qproxy's private folder), the rest as written.
        self.thread.start()
        self.save_file("conflict")
        self.thread.join()
        files = sorted(self.storage.listdir("")[1])
        self.assertEqual(files[0], "conflict")
        self.assertRegex(files[1], f"conflict_{django_tests.FILE_SUFFIX_REGEX}")


class QueuedFileStoragePathParsing(QueuedSetup, django_tests.FileStoragePathParsing):  # type: ignore[misc]
    pass


class QueuedContentFileStorageTestCase(QueuedSetup, django_tests.ContentFileStorageTestCase):  # type: ignore[misc]
    pass


class QueuedFileLikeObjectTestCase(QueuedSetup, django_tests.FileLikeObjectTestCase):  # type: ignore[misc]
    pass


# -- test_base.py, test_generate_filename.py ---------------------------------------------------


class QueuedStorageValidateFileNameTests(test_base.StorageValidateFileNameTests):  # type: ignore[misc]
    """Django's name checks in Storage.save(), on QueuedStorage (which keeps them)."""

    def setUp(self) -> None:
        patch = mock.patch.object(test_base, "CustomStorage", QueuedStorage)
        patch.start()
        self.addCleanup(patch.stop)


class QueuedStorageGenerateFilenameTests(test_generate_filename.StorageGenerateFilenameTests):  # type: ignore[misc]
    storage_class = QueuedStorage


# -- test_inmemory_storage.py: the Storage API with no filesystem under it ---------------------


@not_applicable
class QueuedStorageIOTests(QueuedSetup, test_inmemory_storage.MemoryStorageIOTests):  # type: ignore[misc]
    def setUp(self) -> None:
        super().setUp()
        self.storage = QueuedStorage()

    def test_url(self) -> None:
        # Adapted: QueuedStorage's URLs default to QPROXY_PUBLIC_PATH, not MEDIA_URL, so the
        # missing base URL is base_url=None; the rest as written.
        self.assertRaises(ValueError, QueuedStorage(base_url=None).url, ("file.txt",))
        storage = QueuedStorage(base_url="http://www.example.com")
        self.assertEqual(storage.url("file.txt"), "http://www.example.com/file.txt")
