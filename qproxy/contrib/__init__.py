"""Framework integrations under their usual import paths (``qproxy.contrib.django``)."""
