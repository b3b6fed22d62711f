"""Builds the one extension, mmfast._C: C++ CPU kernels always, CUDA kernels when torch has CUDA
and nvcc is found.

Environment:
  MMFAST_SKIP_CUDA=1        build the CPU kernels only
  MMFAST_CUDA_ARCHS="80;90a" the CUDA archs (default: sm_80 + sm_90a)
  MAX_JOBS                  parallel compile jobs (default: from cores and memory)
  CUDA_HOME                 toolkit root; defaults to /usr/local/cuda when unset, because torch's
                            guess from the `nvcc` wrapper on the PATH here is the wrong root and the
                            link then fails with `cannot find -lcudart` (measured).
"""
import glob
import os
import shutil

if "CUDA_HOME" not in os.environ and os.path.isdir("/usr/local/cuda"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"  # must precede the torch.utils.cpp_extension import

import torch  # noqa: E402
from setuptools import find_packages, setup  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))
VERSION = "0.1.0"


def _max_jobs() -> str:
    # Each nvcc/g++ job against torch's headers peaks near 1.5 GB; keep one job per core and per 2 GB.
    cores = os.cpu_count() or 1
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gb = 4
    return str(max(1, min(cores, int(mem_gb // 2))))


def _cuda_wanted() -> bool:
    if os.environ.get("MMFAST_SKIP_CUDA", "0") == "1":
        return False
    return torch.version.cuda is not None and (
        shutil.which("nvcc") is not None or os.path.exists(os.path.join(os.environ.get("CUDA_HOME", ""), "bin", "nvcc"))
    )


def _gencode_flags(archs: str):
    flags = []
    for arch in archs.replace(",", ";").split(";"):
        arch = arch.strip()
        if arch:
            # -gencode form: the -arch=sm_90a shorthand also runs a plain sm_90 pass (HOPPER.md).
            flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
    return flags


os.environ.setdefault("MAX_JOBS", _max_jobs())
with_cuda = _cuda_wanted()
cuda_archs = os.environ.get("MMFAST_CUDA_ARCHS", "80;90a")

sources = ["csrc/mmfast.cpp", "csrc/autograd.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
cxx_flags = ["-O3", "-std=c++20", "-fopenmp", os.environ.get("MMFAST_CPU_ARCH_FLAGS", "-march=native")]
define_macros = [("MMFAST_VERSION", f'"{VERSION}"')]
extra_compile_args = {"cxx": cxx_flags}
Extension = cpp_extension.CppExtension
if with_cuda:
    Extension = cpp_extension.CUDAExtension
    sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    define_macros += [("MMFAST_WITH_CUDA", "1"), ("MMFAST_CUDA_ARCHS", f'"{cuda_archs}"')]
    extra_compile_args["nvcc"] = ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo",
                                  f"--threads={os.environ.get('NVCC_THREADS', '1')}"] + _gencode_flags(cuda_archs)

ext = Extension(
    name="mmfast._C",
    sources=sources,
    include_dirs=[os.path.join(ROOT, "csrc", "include")],
    define_macros=define_macros,
    extra_compile_args=extra_compile_args,
    extra_link_args=["-fopenmp"],
)

setup(
    name="mmfast",
    version=VERSION,
    packages=find_packages(include=["mmfast", "mmfast.*"]),
    package_data={"mmfast.tuning": ["*.json"]},  # the dispatch tables of `auto` on GPUs
    ext_modules=[ext],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
