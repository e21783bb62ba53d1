"""Build skillkern, with the optional compiled extension skillkern._C from csrc/.

Install: pip install --no-build-isolation -e '.[test]'   (torch must already be installed: the build links to it)

Environment:
  SKILLKERN_NO_EXT=1        pure-Python package, no extension
  SKILLKERN_REQUIRE_EXT=1   a failed extension build fails the install (otherwise: one-line reason, then fallback)
  SKILLKERN_CUDA_ARCHS      CUDA architectures for csrc/*.cu, default "80;90" (PTX added for the last one)
"""

import glob
import os
import sys

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

# The oldest versions the kernels support, and what is tested with them: CI runs the compile gate (every Triton
# launch configuration compiled for sm_80 and sm_90) against Triton 3.6 as well as the newest, and the CUDA
# image the device suite runs on carries torch 2.11 + Triton 3.6 (benchmarks/gpu_suite.sh).
OLDEST_TORCH = "2.11"
OLDEST_TRITON = "3.6.0"

NO_EXT = os.environ.get("SKILLKERN_NO_EXT") == "1"
REQUIRE_EXT = os.environ.get("SKILLKERN_REQUIRE_EXT") == "1"


def _remove_stale_builds():
    # An in-place (editable) build from earlier would otherwise still be imported, maybe against another torch.
    for path in glob.glob(os.path.join("skillkern", "_C.*.so")) + glob.glob(os.path.join("skillkern", "_C.*.pyd")):
        print(f"skillkern: removing stale {path}")
        os.remove(path)


def _extensions():
    if NO_EXT:
        print("skillkern: SKILLKERN_NO_EXT=1, building the pure-Python package")
        _remove_stale_builds()
        return []
    cpp = sorted(glob.glob("csrc/*.cpp"))
    cu = sorted(glob.glob("csrc/*.cu"))
    # Apple clang has no -fopenmp; there at::parallel_for runs serially, which is still correct.
    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
    # rpath to torch's libraries so that `import skillkern._C` works even before `import torch` (the loader then
    # finds libc10.so & co. itself, and libgomp resolves to torch's copy: one OpenMP runtime in the process).
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    link = openmp + ([] if sys.platform == "win32" else [f"-Wl,-rpath,{torch_lib}"])
    # No -std flag: BuildExtension picks the standard the installed torch's headers need (C++17 for older torch,
    # C++20 since 2.10); our sources are plain C++17.
    # -ffp-contract=off: no fused multiply-add, so that the compiled moments (a square, then an addition) round as
    # the PyTorch reference's separate operations do.
    cxx = ["-O3", "-ffp-contract=off"] + openmp
    nvcc_path = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None
    if cu and torch.version.cuda and nvcc_path and os.path.exists(nvcc_path):
        archs = [a.strip() for a in os.environ.get("SKILLKERN_CUDA_ARCHS", "80;90").split(";") if a.strip()]
        # Explicit -gencode flags also stop torch from guessing architectures from the build machine's GPU.
        # tests/test_csrc_cuda.py compiles csrc/*.cu with the same flags on machines without CUDA torch.
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        gencode.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
        nvcc = ["-O3", "-lineinfo"] + gencode
        print(f"skillkern: building the CPU and CUDA ops (sm_{', sm_'.join(archs)} + PTX; CUDA_HOME={CUDA_HOME})")
        return [CUDAExtension("skillkern._C", cpp + cu, extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                              extra_link_args=link)]
    if cu:
        why = (f"torch {torch.__version__} is built without CUDA" if not torch.version.cuda
               else "nvcc not found (set CUDA_HOME to the CUDA toolkit)")
        print(f"skillkern: CUDA sources {' '.join(cu)} skipped: {why}; building the CPU ops only")
    return [CppExtension("skillkern._C", cpp, extra_compile_args={"cxx": cxx}, extra_link_args=link)]


class OptionalBuildExtension(BuildExtension):
    """Builds the extension, but a failure falls back to the pure-Python package unless SKILLKERN_REQUIRE_EXT=1."""

    def run(self):
        try:
            super().run()
        except Exception as err:  # compiler missing, compile error, linker error, ...
            if REQUIRE_EXT:
                raise
            reason = " ".join(str(err).split())[:300]
            print(f"skillkern: extension skillkern._C not built ({type(err).__name__}: {reason}); "
                  "falling back to the PyTorch references (set SKILLKERN_REQUIRE_EXT=1 to make this an error)")
            # Nothing was built, so an editable install must not try to copy it into the source tree.
            self.extensions = []
            _remove_stale_builds()


setup(
    name="skillkern",
    version="0.1.0",
    description="Find, score and use the skill neurons of pre-trained transformers",
    packages=find_packages(include=["skillkern", "skillkern.*"]),
    python_requires=">=3.10",
    install_requires=[f"torch>={OLDEST_TORCH}", "transformers>=4.40", "numpy", "safetensors", "tqdm", "matplotlib",
                      "ninja"],
    extras_require={"test": ["pytest", f"triton>={OLDEST_TRITON}"], "hub": ["datasets"],
                    "triton": [f"triton>={OLDEST_TRITON}"], "multigpu": ["accelerate"]},
    entry_points={"console_scripts": ["skillkern=skillkern.cli:main"]},
    ext_modules=_extensions(),
    cmdclass={"build_ext": OptionalBuildExtension},
)
