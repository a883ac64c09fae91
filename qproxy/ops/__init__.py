"""Operating a node: the ``qproxy`` command, ``qproxy doctor`` and the nginx config.
Nothing in the runtime imports these."""
