#!/usr/bin/env bash
# Configure, build and run the CMake build (CMakeLists.txt) against the venv's torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
torch_dir=$($PY -c 'import torch, os; print(os.path.dirname(torch.__file__))')
site=$(dirname "$torch_dir")
nvrtc=$(ls "$site"/nvidia/cu13/lib/libnvrtc.so.13 2>/dev/null || true)
with_cuda=ON
if [ "${MMFAST_SKIP_CUDA:-0}" = 1 ] || [ ! -x "$CUDA_HOME/bin/nvcc" ]; then with_cuda=OFF; fi
jobs=${MAX_JOBS:-$(nproc)}
TORCH_CUDA_ARCH_LIST="8.0;9.0a" cmake -S . -B cmake-build -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$torch_dir/share/cmake" \
  -DCUDA_TOOLKIT_ROOT_DIR="$CUDA_HOME" -DCMAKE_CUDA_COMPILER="$CUDA_HOME/bin/nvcc" \
  ${nvrtc:+-DCUDA_nvrtc_LIBRARY="$nvrtc"} \
  -DMMFAST_WITH_CUDA=$with_cuda -DTORCH_CUDA_ARCH_LIST="8.0;9.0a" -Wno-dev > cmake-build.log 2>&1 || { cat cmake-build.log; exit 1; }
cmake --build cmake-build -j "$jobs"
cd cmake-build && ctest --output-on-failure
