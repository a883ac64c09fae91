"""Django's own tests/file_storage suite on QueuedStorage, with a real worker.

The suite runs in its own process (Django is set up once per process, with Django's test
app installed), by Django's test runner, against a stack of its own: see
tests/django_suite/suite.py for what is adapted and what does not apply, and why.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import django

from tests.conftest import ROOT, _stack
from tests.django_suite.fetch import django_tests

# Django's tests that run (not skipped) on QueuedStorage: a floor, so that a change that
# stops them running (an import that breaks a class, say) fails here.
AT_LEAST_RUN = 80


def test_djangos_file_storage_suite() -> None:
    django_tests()  # fetched before the stack starts (a download is no test of the stack)
    with _stack(QPROXY_KEEP_LOCAL_SECONDS="3600") as stack:
        done = subprocess.run(
            [sys.executable, "-m", "tests.django_suite.run"],
            env={
                **os.environ,
                **stack.env,
                "DJANGO_SETTINGS_MODULE": "tests.django_suite.settings",
            },
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )
    report = done.stderr
    bad = re.findall(r"^(?:FAIL|ERROR): (\S+ \([^)]*\))", report, re.M)
    assert done.returncode == 0 and not bad, f"Django {django.__version__}:\n" + report[-20000:]
    ran = len(re.findall(r"\.\.\. ok$", report, re.M))
    assert ran >= AT_LEAST_RUN, report[-5000:]
    # Every skip is one of the listed ones, with its reason.
    skipped = re.findall(r"\.\.\. skipped (['\"])(.*?)\1$", report, re.M)
    assert skipped and all(reason.startswith("not applicable:") for _, reason in skipped)
