"""Fetch Django's own ``tests/file_storage`` for the Django installed here.

The tests are not in Django's wheel, only in its sdist: ``pip download`` fetches that (from
whatever index pip is set up to use) and the folder is unpacked into ``.cache/`` beside the
project, once per Django version.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import django

ROOT = Path(__file__).resolve().parents[2]
WANTED = ("tests/file_storage/",)


def django_tests(version: str = django.__version__) -> Path:
    """The folder holding Django's ``file_storage`` test package (fetched if missing)."""
    home = ROOT / ".cache" / "django-tests" / version
    if (home / "file_storage" / "tests.py").exists():
        return home
    with tempfile.TemporaryDirectory() as scratch:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--no-binary",
                ":all:",
                f"django=={version}",
                "-d",
                scratch,
            ],
            check=True,
        )
        (sdist,) = Path(scratch).glob("[Dd]jango-*.tar.gz")
        with tarfile.open(sdist) as tar:
            top = f"{tar.getnames()[0].split('/')[0]}/"
            members = []
            for member in tar.getmembers():
                inner = member.name.removeprefix(top)
                if member.isfile() and inner.startswith(WANTED):
                    member.name = inner.removeprefix("tests/")
                    members.append(member)
            partial = home.with_name(version + ".partial")
            tar.extractall(partial, members=members, filter="data")
    partial.replace(home)
    return home


if __name__ == "__main__":
    print(django_tests())
