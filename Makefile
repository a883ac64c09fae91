# The whole set-up: `make demo` and `make test`. Both install what is missing first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test lint typecheck pytest system-deps clean example-flask example-fastapi example-django

## system-deps: Debian's redis-server and nginx (installed when run as root and absent)
system-deps:
	@missing=""; \
	command -v redis-server >/dev/null || [ -x /usr/bin/redis-server ] || missing="$$missing redis-server"; \
	command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing="$$missing nginx"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else \
	    echo "note: missing$$missing; install with: sudo apt-get install$$missing"; \
	  fi; \
	fi

## the virtualenv with qproxy (editable) and what the tests need
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[test]'
	touch $@

demo: system-deps $(STAMP)
	$(BIN)/qproxy demo

## the examples, each on the whole stack (Ctrl-C stops it)
example-flask: system-deps $(STAMP)
	$(BIN)/qproxy demo --app examples.flask_app:app
example-fastapi: system-deps $(STAMP)
	$(BIN)/qproxy demo --app examples.fastapi_app:app
example-django: system-deps $(STAMP)
	$(BIN)/qproxy demo --app examples.django_app:app

test: system-deps $(STAMP) lint typecheck pytest

lint: $(STAMP)
	$(BIN)/ruff check qproxy tests examples
	$(BIN)/ruff format --check qproxy tests examples

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/pytest

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
