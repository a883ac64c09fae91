"""Django's own ``tests/file_storage`` suite, from the sdist of the Django installed, run
against QueuedStorage on a real stack: see :mod:`tests.django_suite.suite`."""
