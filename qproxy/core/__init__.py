"""qproxy's sans-IO core: no sockets, files, Redis, boto3 or Celery (a test checks it).

- :mod:`~qproxy.core.multipart` - multipart and raw-body rewriting (bytes in, events out)
- :mod:`~qproxy.core.upload` - the upload HTTP policy: plan, refusals, the commit rule
- :mod:`~qproxy.core.record` - a file's record, its states and their stored form
- :mod:`~qproxy.core.decision` - where a GET's bytes come from, and the answer nginx gets
"""
