"""For development and tests: the local stack (devstack), the demo and its app.
Nothing in the runtime imports these."""
