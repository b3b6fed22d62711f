# Two commands do all the set-up (README): `make bench` and `make test`.
# Each creates/refreshes .venv from requirements.txt, builds mmfast._C in place without build
# isolation (isolation would download torch again), then runs.
PY      := .venv/bin/python
STAMP   := .venv/.requirements-installed
CUDA_HOME ?= /usr/local/cuda
export CUDA_HOME
# Serialize concurrent builds in one tree (ninja in two processes would race on the .so).
LOCK    := flock /tmp/mmfast-build-$(shell id -u).lock

.PHONY: venv build cmake-test test bench clean

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

test: build cmake-test
	$(PY) -m pytest tests

bench: build
	$(PY) -m mmfast bench $(BENCH_ARGS)

clean:
	rm -rf build cmake-build mmfast/_C*.so
