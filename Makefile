# fleet: `make serve` and `make test` work on a fresh clone with nothing installed by hand.
SHELL := /bin/bash
PYTHON ?= python3
# Triton's Python-backend stub only loads under Debian's interpreter (see README).
TRITON_PYTHON ?= /usr/bin/python3
VENV := .venv
TRITON_VENV := .venv-triton
# The KServe Python SDK, a second v2 client in the tests (tests/integration/test_kserve_client.py): its own venv,
# as its pins (protobuf 4, httpx 0.27, uvicorn 0.30) would downgrade fleet's.
KSERVE_VENV := .venv-kserve
KSERVE := kserve==0.15.2
PY := $(VENV)/bin/python
REPOSITORY ?= model_repository
TORCH := torch==2.13.0
NATIVE_SOURCES := $(wildcard native/src/*.cpp native/src/*.hpp) native/CMakeLists.txt
NGHTTP2_HEADER := /usr/include/nghttp2/nghttp2.h
# (pip compiles every module's bytecode: with PYTHONDONTWRITEBYTECODE set, as on CI, nothing else would, and
# every process of a test cluster would compile torch and Ray again.)
PIP_QUIET := -q --disable-pip-version-check
PYTEST_ARGS ?=

.PHONY: serve test test-deps system-packages test-unit test-integration setup triton-env kserve-env bench wrk h2load prometheus sanitize clean help

help:
	@echo "make serve   set up and serve on http://127.0.0.1:8000 (Ctrl-C stops)"
	@echo "make test    set up and run the whole test suite"
	@echo "make bench   fleet against Triton, Ray Serve and plain HTTP (BENCH_ARGS=--quick for a short run)"

setup: $(VENV)/.installed

# (the native gRPC transport, native._h2, links libnghttp2: its headers are installed before the build)
$(VENV)/.installed: pyproject.toml $(NATIVE_SOURCES) | $(NGHTTP2_HEADER)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(PIP_QUIET) --upgrade pip
	# torch first: the CPU build on disk, so no CUDA build of several GB is fetched
	$(PY) -m pip install $(PIP_QUIET) $(TORCH)
	CMAKE_BUILD_PARALLEL_LEVEL=2 $(PY) -m pip install $(PIP_QUIET) -e '.[dev]'
	@touch $@

triton-env: $(TRITON_VENV)/.installed

$(TRITON_VENV)/.installed:
	@test -x $(TRITON_VENV)/bin/python || $(TRITON_PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/python -m pip install $(PIP_QUIET) --upgrade pip
	$(TRITON_VENV)/bin/python -m pip install $(PIP_QUIET) $(TORCH) 'numpy<2' 'nvidia-pytriton==0.7.0'
	@touch $@

kserve-env: $(KSERVE_VENV)/.installed

$(KSERVE_VENV)/.installed:
	@test -x $(KSERVE_VENV)/bin/python || $(PYTHON) -m venv $(KSERVE_VENV)
	# (no bytecode compiled: one short process per test run imports the SDK, ~3 s, where compiling all of it
	# at install, kubernetes' client models included, costs ~20 s of CPU beside the other venvs' installs)
	$(KSERVE_VENV)/bin/python -m pip install $(PIP_QUIET) --no-compile $(KSERVE)
	@touch $@

# The example models are trained and published only into an empty repository.
serve: $(VENV)/.installed
	$(PY) -m training.bootstrap --repository $(REPOSITORY) --if-empty
	$(VENV)/bin/fleet serve --repository $(REPOSITORY)

# The whole suite with the compiled kernels, then again with FLEET_PURE_PYTHON=1 (the NumPy references)
# over every test whose outcome the kernels decide: the unit tests of the kernels and of the request
# decoding, validation and preprocessing around them, and the request path of a live cluster.
PURE_PYTHON_UNIT := tests/unit/test_native*.py tests/unit/test_protocol*.py tests/unit/test_preprocess.py \
  tests/unit/test_validation.py tests/unit/test_limits.py tests/unit/test_digits.py tests/unit/test_admin.py \
  tests/unit/test_contracts.py tests/unit/test_grpc_transport.py
PURE_PYTHON_LIVE := tests/integration/test_http_api.py tests/integration/test_bad_input.py \
  tests/integration/test_preprocess_live.py tests/integration/test_batching_live.py \
  tests/integration/test_limits_live.py tests/integration/test_monitoring_contracts.py \
  tests/integration/test_fuzz.py::test_byte_level_fuzz_of_infer_gets_no_5xx_and_leaves_the_cluster_healthy
UNIT_LOG := build/unit-tests.log
PURE_LOG := build/pure-python-live.log

# Everything the tests need, at once: the three venvs' installs side by side; the Debian packages go one after
# the other (dpkg takes one install at a time).
test-deps:
	@$(MAKE) --no-print-directory -j4 $(VENV)/.installed $(SIDE_VENVS) system-packages

system-packages:
	@$(MAKE) --no-print-directory wrk
	@$(MAKE) --no-print-directory prometheus

# Triton's venv and the KServe SDK's: only the integration tests use them.
SIDE_VENVS := $(TRITON_VENV)/.installed $(KSERVE_VENV)/.installed
SIDE_LOG := build/side-venvs.log

# The unit tests need no cluster and the e2e tests leave a core idle a third of the time: the unit tests (both
# passes) run beside the e2e tests, the venvs only the integration tests use are built at nice 19 beside them
# (output in $(SIDE_LOG)), and once both are done the live request path again with FLEET_PURE_PYTHON=1, on a
# cluster of its own, still beside the e2e tests ($(PURE_LOG), printed when they end). The integration tests
# start when all of that has ended: nothing runs beside the cluster they time. The unit tests' report ($(UNIT_LOG))
# is printed at the end.
test:
	@$(MAKE) --no-print-directory -j2 $(VENV)/.installed system-packages
	@mkdir -p build && rm -f build/.side-done build/.unit-done
	@{ nice -n 19 $(MAKE) --no-print-directory -j2 $(SIDE_VENVS) > $(SIDE_LOG) 2>&1; rc=$$?; \
	   touch build/.side-done; exit $$rc; } & side=$$!; \
	{ { $(PY) -m pytest -q -p no:cacheprovider tests/unit $(PYTEST_ARGS) && \
	    FLEET_PURE_PYTHON=1 $(PY) -m pytest -q -p no:cacheprovider $(PURE_PYTHON_UNIT) $(PYTEST_ARGS); } \
	  > $(UNIT_LOG) 2>&1; rc=$$?; touch build/.unit-done; exit $$rc; } & unit=$$!; \
	{ until test -e build/.side-done && test -e build/.unit-done; do sleep 1; done; \
	  FLEET_PURE_PYTHON=1 $(PY) -m pytest -q -p no:cacheprovider $(PURE_PYTHON_LIVE) $(PYTEST_ARGS); } \
	  > $(PURE_LOG) 2>&1 & pure=$$!; trap 'kill $$unit $$side $$pure 2>/dev/null' INT TERM; \
	echo "$(PY) -m pytest -q tests/e2e $(PYTEST_ARGS)   (beside it: the unit tests, $(UNIT_LOG); $(SIDE_VENVS), \
	$(SIDE_LOG); then FLEET_PURE_PYTHON=1 over $(PURE_PYTHON_LIVE), $(PURE_LOG))"; \
	$(PY) -m pytest -q tests/e2e $(PYTEST_ARGS); e2e=$$?; \
	if ! wait $$side; then cat $(SIDE_LOG); echo "make test: building $(SIDE_VENVS) failed" >&2; \
	  kill $$unit $$pure 2>/dev/null; exit 1; fi; \
	wait $$pure; purepy=$$?; echo "== FLEET_PURE_PYTHON=1 over the live request path, run beside them ($(PURE_LOG)):"; \
	cat $(PURE_LOG); \
	echo "$(PY) -m pytest -q tests/integration $(PYTEST_ARGS)"; \
	$(PY) -m pytest -q tests/integration $(PYTEST_ARGS); integration=$$?; \
	wait $$unit; units=$$?; echo "== the unit tests, run beside them ($(UNIT_LOG)):"; cat $(UNIT_LOG); \
	test $$e2e = 0 && test $$purepy = 0 && test $$integration = 0 && test $$units = 0

test-unit: $(VENV)/.installed prometheus
	$(PY) -m pytest -q tests/unit $(PYTEST_ARGS)

test-integration: test-deps
	$(PY) -m pytest -q tests/integration tests/e2e $(PYTEST_ARGS)

# Debian's libnghttp2-dev: the headers and pkg-config file native._h2 builds against, installed only when the
# header is missing. `make test` builds the venv beside system-packages' installs: apt waits for dpkg's lock.
$(NGHTTP2_HEADER):
	@if [ "$$(id -u)" = 0 ]; then sudo=; else sudo=sudo; fi; apt="apt-get -o DPkg::Lock::Timeout=600"; \
	$$sudo $$apt update -qq && $$sudo $$apt install -y -qq libnghttp2-dev pkg-config

wrk:
	@command -v wrk >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq wrk; \
	  else sudo apt-get update -qq && sudo apt-get install -y -qq wrk; fi; }

# Debian's prometheus package: promtool checks fleet's /metrics and alert rules, and the tests start their own
# Prometheus server on a free port. Installing it must not start the system one on :9090 (nor pull in
# node-exporter on :9100): a policy-rc.d forbids starting services during the install (init scripts and
# deb-systemd-invoke both ask it), and a unit that a systemd machine enabled or started anyway is disabled
# and stopped, as is a system Prometheus an init script started. Only a fresh install touches the services.
prometheus:
	@command -v promtool >/dev/null && command -v prometheus >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then sudo=; else sudo=sudo; fi; \
	  policy=/usr/sbin/policy-rc.d; ours=; \
	  if [ ! -e $$policy ]; then \
	    printf '#!/bin/sh\nexit 101\n' | $$sudo tee $$policy >/dev/null && $$sudo chmod 755 $$policy && ours=1; fi; \
	  trap '[ -z "$$ours" ] || $$sudo rm -f /usr/sbin/policy-rc.d' EXIT; \
	  $$sudo apt-get update -qq && \
	  $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus || exit 1; \
	  if [ -d /run/systemd/system ]; then $$sudo systemctl disable --now prometheus.service >/dev/null 2>&1 || true; \
	  elif [ -x /etc/init.d/prometheus ]; then $$sudo /etc/init.d/prometheus stop >/dev/null 2>&1 || true; \
	    $$sudo update-rc.d prometheus disable >/dev/null 2>&1 || true; fi; \
	  command -v promtool >/dev/null && command -v prometheus >/dev/null || \
	    { echo "make prometheus: promtool or prometheus still missing after the install" >&2; exit 1; }; }

bench: $(VENV)/.installed $(TRITON_VENV)/.installed wrk h2load
	$(PY) -m benchmarks $(BENCH_ARGS)

# nghttp2's h2load: the C load generator of the gRPC rows (benchmarks/h2load.py, python -m benchmarks.protocols).
h2load:
	@command -v h2load >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq nghttp2-client; \
	  else sudo apt-get update -qq && sudo apt-get install -y -qq nghttp2-client; fi; }

# The native kernels and the native gRPC transport under AddressSanitizer and UBSan: a wheel built with FLEET_SANITIZE=ON into
# build/sanitize (the .venv's install is left alone) and unpacked there, first on the path of a Python
# started without site (-S: no editable-install finder) nor the working directory (-P: not the source
# tree), which runs the native parity and fuzz tests against it. libstdc++ is preloaded with libasan so
# that ASan's interceptor of C++ throws finds the real one (Python itself is C).
sanitize: $(VENV)/.installed
	rm -rf build/sanitize/dist build/sanitize/site
	$(PY) -m pip wheel $(PIP_QUIET) --no-deps -w build/sanitize/dist -C cmake.define.FLEET_SANITIZE=ON \
	  -C cmake.build-type=RelWithDebInfo -C build-dir=build/sanitize/cmake .
	$(PY) -m zipfile -e build/sanitize/dist/fleet-*.whl build/sanitize/site
	LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libstdc++.so)" ASAN_OPTIONS=detect_leaks=0 \
	  UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
	  PYTHONPATH="build/sanitize/site:$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
	  $(PY) -S -P -m pytest -q -p no:cacheprovider tests/unit/test_native*.py tests/unit/test_grpc_transport.py $(PYTEST_ARGS)

clean:
	rm -rf build $(VENV) $(TRITON_VENV) $(KSERVE_VENV)
