"""Builds ccl_ops._C: the C++ (CPU) kernels always, the CUDA kernels when nvcc is found and torch has CUDA
(or when FORCE_CUDA=1; FORCE_CUDA=0 turns them off). Build against the torch you run with:
``pip install --no-build-isolation -e .``
"""
import glob
import os
import platform
import shutil

# With nvcc also on PATH outside the toolkit (/usr/local/bin), torch would guess CUDA_HOME=/usr/local and fail to
# link cudart: prefer the toolkit's own folder when the user did not choose one.
if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from setuptools import find_packages, setup  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _want_cuda() -> bool:
    forced = os.environ.get("FORCE_CUDA")
    if forced is not None:
        return forced == "1"
    nvcc = shutil.which("nvcc") or (CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")))
    return bool(nvcc) and torch.version.cuda is not None


def _extension():
    sources = _sources("csrc/*.cpp") + _sources("csrc/ops/*.cpp") + _sources("csrc/cpu/*.cpp")
    # The C++ standard is the one torch.utils.cpp_extension picks for this torch. at::parallel_for is a header
    # template over OpenMP: without -fopenmp here it silently runs on one thread.
    cxx = ["-O3", "-fopenmp"]
    if platform.machine() in ("x86_64", "AMD64"):
        # at::vec's AVX2 path (Sleef exp/log, exported by libtorch_cpu); the binary then needs an AVX2 CPU.
        cxx += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    if not (_want_cuda() and _sources("csrc/cuda/*.cu")):
        print("ccl_ops: building the C++ (CPU) kernels only")
        return CppExtension("ccl_ops._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    if not torch.cuda.is_available() and "TORCH_CUDA_ARCH_LIST" not in os.environ:
        # No GPU to ask: build for Ampere and Hopper instead of every architecture torch knows.
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    print(f"ccl_ops: building the C++ and CUDA kernels (TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST')})")
    nvcc = ["-O3", "--use_fast_math", "-lineinfo"]
    return CUDAExtension(
        "ccl_ops._C",
        sources + _sources("csrc/cuda/*.cu"),
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        extra_link_args=["-fopenmp"],
    )


setup(
    packages=find_packages(include=["ccl_ops", "ccl_ops.*", "ccl_bench", "ccl_bench.*", "baselines", "baselines.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)},
)
