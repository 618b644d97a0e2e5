# Two entry points, each doing all set-up on a fresh machine (see scripts/install.sh).
PYTHON ?= python3

.PHONY: demo test install install-test bench

demo: install
	$(PYTHON) -m fastrome demo

test: install-test
	$(PYTHON) -m pytest

install:
	PYTHON=$(PYTHON) sh scripts/install.sh

install-test:
	PYTHON=$(PYTHON) sh scripts/install.sh --test

bench: install-test
	$(PYTHON) -m pytest benches --benchmark-only
