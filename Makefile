# Two commands do all the set-up (README): `make bench` and `make test`.
# Each creates/refreshes .venv from requirements.txt, builds mmfast._C in place without build
# isolation (isolation would download torch again), then runs.
PY      := .venv/bin/python
STAMP   := .venv/.requirements-installed
CUDA_HOME ?= /usr/local/cuda
export CUDA_HOME
# sam2 (a test pin, source release) would try to build its optional CUDA extension and fail without a GPU.
export SAM2_BUILD_CUDA = 0
# Serialize concurrent builds in one tree (ninja in two processes would race on the .so).
LOCK    := flock /tmp/mmfast-build-$(shell id -u).lock

.PHONY: venv build cmake-test test bench bench-full clean

$(STAMP): requirements.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $(STAMP)

venv: $(STAMP)

build: venv
	$(LOCK) $(PY) setup.py -q build_ext --inplace

# The same sources through CMake's find_package(Torch), plus a native test of the CPU kernels.
cmake-test: venv
	$(LOCK) bash tools/cmake_build.sh

# MMFAST_COVERAGE_GUARD: a (backend, device, dtype) the op tests claim that did not run and pass fails the run.
test: build cmake-test
	MMFAST_COVERAGE_GUARD=1 $(PY) -m pytest tests

# The quick cases and sample budget (a few minutes on the 2-core CPU); bench-full adds the loss sweeps and the
# full budget (about an hour there).
bench: build
	$(PY) -m mmfast bench --quick $(BENCH_ARGS)

bench-full: build
	$(PY) -m mmfast bench $(BENCH_ARGS)

clean:
	rm -rf build cmake-build mmfast/_C*.so
