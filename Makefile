# The whole set-up: `make demo` and `make test`. Both install what is missing first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# s3rver (npm): the S3 that checks presigned URLs (tests/stores/test_s3_presigned.py)
S3RVER := .cache/s3rver/node_modules/.bin/s3rver
# tus-js-client (npm): a tus client nobody here wrote, under node (tests/drivers/test_tus.py)
TUSJS := .cache/tusjs/node_modules/tus-js-client/package.json
# playwright-core (npm) drives Debian's chromium through the demo page (tests/dev/test_demo.py)
PLAYWRIGHT := .cache/browser/node_modules/playwright-core/package.json

.PHONY: bench static test-django-current demo test lint typecheck pytest system-deps clean example-flask example-fastapi example-django

## system-deps: Debian's redis-server, nginx, npm (for s3rver), iproute2 (the network namespaces of
## tests/cluster), chromium (the demo page's test), systemd (systemd-analyze verify of deploy/'s
## units), and wrk + curl for the benchmarks
## (installed when run as root and absent)
system-deps:
	@missing=""; \
	command -v redis-server >/dev/null || [ -x /usr/bin/redis-server ] || missing="$$missing redis-server"; \
	command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing="$$missing nginx"; \
	command -v wrk >/dev/null || missing="$$missing wrk"; \
	command -v curl >/dev/null || missing="$$missing curl"; \
	command -v npm >/dev/null || missing="$$missing npm"; \
	command -v chromium >/dev/null || [ -x /usr/bin/chromium ] || missing="$$missing chromium"; \
	command -v systemd-analyze >/dev/null || missing="$$missing systemd"; \
	command -v ip >/dev/null || [ -x /usr/sbin/ip ] || [ -x /sbin/ip ] || missing="$$missing iproute2"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else \
	    echo "note: missing$$missing; install with: sudo apt-get install$$missing"; \
	  fi; \
	fi

## the virtualenv with qproxy (editable) and what the tests need, installed by uv (a fresh
## venv in ~10 s, pip took ~60 s; pip still does it where uv cannot be had)
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	if $(BIN)/pip install -q uv; then \
	  $(BIN)/uv pip install -q --python $(BIN)/python -e '.[test,bench]'; \
	else \
	  $(BIN)/pip install -q -e '.[test,bench]'; \
	fi
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

test: system-deps $(STAMP) lint typecheck pytest test-django-current

## Django 6 needs Python >= 3.12: where one is on the machine, run the Django tests there too.
NEWER_PYTHON := $(firstword $(foreach p,python3.13 python3.12,$(shell $(p) -c 'import sys; print(sys.executable) if sys.version_info >= (3, 12) else None' 2>/dev/null)) $(wildcard $(HOME)/.pyenv/versions/3.1[2-9]*/bin/python3))
NEWER_VENV := .venv-django-current

test-django-current: system-deps $(STAMP)
	@if [ -z "$(NEWER_PYTHON)" ]; then \
	  echo "note: no Python >= 3.12 here: the Django tests ran on Django 5.2 only"; \
	else \
	  [ -f $(NEWER_VENV)/.stamp ] || { $(NEWER_PYTHON) -m venv $(NEWER_VENV) && \
	    { [ -x $(BIN)/uv ] && $(BIN)/uv pip install -q --python $(NEWER_VENV)/bin/python -e '.[test]' \
	      || $(NEWER_VENV)/bin/pip install -q -e '.[test]'; } && touch $(NEWER_VENV)/.stamp; }; \
	  $(NEWER_VENV)/bin/python -c 'import django, sys; print(f"Django {django.__version__} on Python {sys.version.split()[0]}")'; \
	  $(NEWER_VENV)/bin/pytest -q $(XDIST) tests/drivers/test_django.py tests/drivers/test_django_suite.py; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check qproxy tests examples bench
	$(BIN)/ruff format --check qproxy tests examples bench

typecheck: $(STAMP)
	$(BIN)/mypy

## Two processes, a test file each at a time (pytest-xdist): most tests wait on servers, so
## two files at once take half the time on two cores. Every test starts its own services on
## ports and namespaces of its own, so they do not meet.
XDIST ?= -n 2 --dist loadfile
pytest: $(STAMP) $(S3RVER) $(TUSJS) $(PLAYWRIGHT)
	$(BIN)/pytest $(XDIST)

$(S3RVER):
	npm install --prefix .cache/s3rver --no-audit --no-fund --silent s3rver@3.7.1

$(TUSJS):
	npm install --prefix .cache/tusjs --no-audit --no-fund --silent tus-js-client@4.3.1

$(PLAYWRIGHT):
	npm install --prefix .cache/browser --no-audit --no-fund --silent playwright-core@1.64.1

## the demo page's tus-js-client, from npm into the package's static files (with its licence);
## tests/dev/test_demo.py checks the copy is npm's
static: $(TUSJS)
	cp .cache/tusjs/node_modules/tus-js-client/dist/tus.min.js qproxy/dev/static/tus.min.js
	{ echo "tus-js-client $$(node -p 'require("./.cache/tusjs/node_modules/tus-js-client/package.json").version') (https://github.com/tus/tus-js-client), dist/tus.min.js from npm, served by the qproxy demo page."; \
	  echo; cat .cache/tusjs/node_modules/tus-js-client/LICENSE; } > qproxy/dev/static/tus-js-client.LICENSE

## benchmarks: ratios against baselines measured in the same run (needs wrk and curl)
bench: system-deps $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) $(NEWER_VENV) .cache .pytest_cache .mypy_cache .ruff_cache
