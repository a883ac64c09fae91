"""What happens to a file on a node, over the stores: taken in from a request
(:mod:`~qproxy.lifecycle.ingest`), committed, queued, deleted
(:mod:`~qproxy.lifecycle.files`). The drivers, the worker and the CLI all go through here,
so every way in commits a file the same way.
"""
