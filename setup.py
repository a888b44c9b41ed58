"""Builds the one compiled extension, ``starfast._C``.

C++ sources (the torch-free LAP solver in ``csrc/lap`` and the CPU op kernels in ``csrc/ops``)
are always compiled. CUDA sources (``csrc/**/cuda/*.cu``) are compiled only when torch sees CUDA
and a toolkit is present; ``FORCE_CUDA=1`` forces them (e.g. on a build host without a GPU) and
``STARFAST_CPU_ONLY=1`` skips them.
"""
import glob
import os

from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension


def _build_cuda() -> bool:
    if os.environ.get("STARFAST_CPU_ONLY") == "1":
        return False
    if os.environ.get("FORCE_CUDA") == "1":
        return True
    import torch

    return torch.cuda.is_available() and CUDA_HOME is not None


def _sources(pattern: str) -> list:
    return sorted(glob.glob(pattern, recursive=True))


cpp_sources = _sources("csrc/lap/*.cpp") + _sources("csrc/ops/*.cpp") + _sources("csrc/ops/cpu/*.cpp")
cxx_flags = ["-O3", "-std=c++17", "-fopenmp", "-DPy_LIMITED_API=0x03090000"]
if _build_cuda():
    extension = CUDAExtension(
        "starfast._C",
        cpp_sources + _sources("csrc/**/cuda/*.cu"),
        extra_compile_args={"cxx": cxx_flags + ["-DSTARFAST_WITH_CUDA"], "nvcc": ["-O3", "--use_fast_math"]},
        extra_link_args=["-fopenmp"],
        py_limited_api=True,
    )
else:
    extension = CppExtension(
        "starfast._C", cpp_sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"],
        py_limited_api=True,
    )

setup(
    ext_modules=[extension],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
