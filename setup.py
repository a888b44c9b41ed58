"""Builds the one compiled extension, ``starfast._C``, without torch.

The compiled core includes no torch headers (see csrc/ops/kernels.hpp): plain C++17 on Python's
limited API (one ``abi3`` build for CPython >= 3.9), so ``pip install .`` needs no torch at build
time and the extension loads with whichever torch is installed; starfast/ops.py registers the
ops through ``torch.library``.

C++ sources (the LAP solver in ``csrc/lap``, the bindings and CPU kernels in ``csrc/ops``) are
always compiled, with OpenMP. CUDA sources (``csrc/ops/cuda/*.cu``) are compiled with nvcc when a
toolkit is found (``$CUDA_HOME``, the toolkit of ``nvcc`` on PATH, or ``/usr/local/cuda``) and
linked with the static CUDA runtime; ``STARFAST_CPU_ONLY=1`` skips them, ``FORCE_CUDA=1`` makes a
missing toolkit an error. ``STARFAST_CUDA_ARCHS`` (default ``75;80;90``) lists the GPU
architectures; the last one is also embedded as PTX, which newer GPUs compile at load time.
"""
import glob
import os
import shutil
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

CXX_FLAGS = ["-O3", "-std=c++17", "-fopenmp", "-fvisibility=hidden"]
NVCC_FLAGS = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden"]
DEFAULT_CUDA_ARCHS = "75;80;90"


def find_cuda_home():
    """The CUDA toolkit to build with (a directory with bin/nvcc and the static runtime), or None;
    FORCE_CUDA=1 turns None into an error."""
    if os.environ.get("STARFAST_CPU_ONLY") == "1":
        return None
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc_on_path = shutil.which("nvcc")
    if nvcc_on_path:  # usually <toolkit>/bin/nvcc; a wrapper script elsewhere falls through
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc_on_path))))
    candidates.append("/usr/local/cuda")
    for home in filter(None, candidates):
        if os.access(os.path.join(home, "bin", "nvcc"), os.X_OK) and cudart_static_dir(home):
            return home
    if os.environ.get("FORCE_CUDA") == "1":
        sys.exit("setup.py: FORCE_CUDA=1 but no CUDA toolkit was found; set CUDA_HOME to one")
    return None


def cudart_static_dir(home: str):
    return next((path for path in (os.path.join(home, lib) for lib in ("lib64", "lib"))
                 if os.path.exists(os.path.join(path, "libcudart_static.a"))), None)


def gencode_flags(archs: str) -> list:
    codes = [arch.strip().replace(".", "") for arch in archs.split(";") if arch.strip()]
    flags = [f"-gencode=arch=compute_{code},code=sm_{code}" for code in codes]
    return flags + [f"-gencode=arch=compute_{codes[-1]},code=compute_{codes[-1]}"]


class BuildWithCuda(build_ext):
    """build_ext that first compiles the extension's ``cuda_sources`` with nvcc into objects, and
    always rebuilds: whether CUDA is built depends on the environment, which setuptools' timestamp
    check cannot see (a CPU-only build left in build/ would otherwise be reused)."""

    def finalize_options(self):
        super().finalize_options()
        self.force = True

    def build_extension(self, ext):
        sources = getattr(ext, "cuda_sources", [])
        if sources:
            nvcc = os.path.join(ext.cuda_home, "bin", "nvcc")
            archs = gencode_flags(os.environ.get("STARFAST_CUDA_ARCHS", DEFAULT_CUDA_ARCHS))
            for source in sources:
                target = os.path.join(self.build_temp, os.path.splitext(source)[0] + ".o")
                os.makedirs(os.path.dirname(target), exist_ok=True)
                command = [nvcc, "-c", source, "-o", target, *NVCC_FLAGS, *archs]
                print(" ".join(command))
                subprocess.check_call(command)
                ext.extra_objects.append(target)
        super().build_extension(ext)


def extension() -> Extension:
    sources = sorted(glob.glob("csrc/lap/*.cpp") + glob.glob("csrc/ops/*.cpp") + glob.glob("csrc/ops/cpu/*.cpp"))
    ext = Extension(
        "starfast._C",
        sources,
        define_macros=[("Py_LIMITED_API", "0x03090000")],
        extra_compile_args=list(CXX_FLAGS),
        extra_link_args=["-fopenmp"],
        py_limited_api=True,
        language="c++",
    )
    cuda_home = find_cuda_home()
    ext.cuda_sources = sorted(glob.glob("csrc/ops/cuda/*.cu")) if cuda_home else []
    ext.depends = sorted(glob.glob("csrc/**/*.hpp", recursive=True) + ext.cuda_sources)
    if cuda_home:
        print(f"setup.py: building the CUDA kernels with the toolkit in {cuda_home}")
        ext.cuda_home = cuda_home
        ext.define_macros.append(("STARFAST_WITH_CUDA", "1"))
        ext.library_dirs.append(cudart_static_dir(cuda_home))
        ext.libraries += ["cudart_static", "rt", "pthread", "dl"]
    else:
        print("setup.py: no CUDA toolkit found (or STARFAST_CPU_ONLY=1): CPU kernels only")
    return ext


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildWithCuda},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
