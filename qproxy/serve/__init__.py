"""Serving files: the resolver nginx asks where each file is (``qproxy.resolver``)."""
