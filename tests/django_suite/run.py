"""Run Django's file_storage suite against QueuedStorage: ``python -m tests.django_suite.run``
with a stack's ``QPROXY_*`` environment (tests/drivers/test_django_suite.py starts one)."""

from __future__ import annotations

import os
import sys


def main() -> int:
    from tests.django_suite.fetch import django_tests

    sys.path.insert(0, str(django_tests()))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.django_suite.settings")
    import django
    from django.test.runner import DiscoverRunner

    django.setup()
    runner = DiscoverRunner(verbosity=2, interactive=False)
    labels = sys.argv[1:] or ["tests.django_suite.suite"]
    return 1 if runner.run_tests(labels) else 0


if __name__ == "__main__":
    sys.exit(main())
