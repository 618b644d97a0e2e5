# Two entry points, each doing all set-up on a fresh machine (see scripts/install.sh).
PYTHON ?= python3

.PHONY: demo test install install-test bench wheel-smoke

demo: install
	$(PYTHON) -m fastrome demo

test: install-test
	$(PYTHON) -m pytest
	PYTHON=$(PYTHON) sh scripts/wheel_smoke.sh

install:
	PYTHON=$(PYTHON) sh scripts/install.sh

install-test:
	PYTHON=$(PYTHON) sh scripts/install.sh --test

bench: install-test
	$(PYTHON) -m pytest benches --benchmark-only

wheel-smoke:
	PYTHON=$(PYTHON) sh scripts/wheel_smoke.sh
