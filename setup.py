"""Packaging for fusedopt.

The Python package lives in python/fusedopt; the Triton kernels in triton_kernels/ are installed
inside it as fusedopt.triton_kernels (the top-level name `triton_kernels` belongs to the Triton
project). The CUDA extension fusedopt._C is built from csrc/ with CMake (CMakeLists.txt) when nvcc
is present; without nvcc the install goes on without it (a warning says so) and the Triton backend
remains. With nvcc present, a compile error fails the install. `python -m fusedopt info` says
whether the extension is there.

Environment:
  FUSEDOPT_CUDA_ARCHS       compute capabilities, CMake list syntax (default "80;90")
  FUSEDOPT_SKIP_CUDA_BUILD  1: do not build fusedopt._C
  MAX_JOBS                  parallel compile jobs (default: CPU count)
  CUDACXX / CUDA_HOME       where nvcc is, when it is not on PATH
"""
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
DEMO_REQUIRES = ["matplotlib", "tqdm"]


def find_nvcc():
    """nvcc from CUDACXX, then PATH, then CUDA_HOME/bin (the places CMake and torch look)."""
    candidates = [os.environ.get("CUDACXX"), shutil.which("nvcc")]
    if os.environ.get("CUDA_HOME"):
        candidates.append(os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc"))
    for candidate in candidates:
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


class CMakeExtension(Extension):
    """An extension whose sources CMake compiles; setuptools only gets the built module."""

    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """build_ext that drives CMakeLists.txt and places the module where setuptools expects it.

    get_ext_fullpath() points into the build directory; for `pip install -e .` setuptools then
    copies the module next to python/fusedopt/__init__.py, for a regular install into the wheel.
    """

    def run(self):
        reason = None
        if os.environ.get("FUSEDOPT_SKIP_CUDA_BUILD", "0") not in ("", "0"):
            reason = "FUSEDOPT_SKIP_CUDA_BUILD is set"
        elif find_nvcc() is None:
            reason = "nvcc not found (PATH, CUDACXX, CUDA_HOME)"
        if reason is not None:
            # A warning, not a print: pip hides the build's output unless -v, but pip >= 26
            # shows the UserWarnings of a build from a local directory (`pip install -e .`).
            warnings.warn(f"fusedopt: {reason}; the CUDA extension fusedopt._C is not built. "
                          "The Triton and reference backends work without it; "
                          "`python -m fusedopt info` shows what is installed.", stacklevel=1)
            # No extension left to build, copy or list among the outputs.
            self.extensions = []
        super().run()

    def build_extension(self, ext):
        import pybind11  # a build requirement (pyproject.toml); imported only when building

        cmake = shutil.which("cmake")
        if cmake is None:
            raise RuntimeError("fusedopt: building fusedopt._C needs cmake >= 3.18 on PATH "
                               "(pip install cmake), or set FUSEDOPT_SKIP_CUDA_BUILD=1")
        output = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        configure = [
            cmake, "-S", str(ROOT), "-B", str(build_dir),
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_CUDA_COMPILER={find_nvcc()}",
            f"-DFUSEDOPT_CUDA_ARCHS={os.environ.get('FUSEDOPT_CUDA_ARCHS', '80;90')}",
            f"-DFUSEDOPT_OUTPUT_DIR={output.parent}",
            f"-DFUSEDOPT_EXT_SUFFIX={output.name[len(ext.name.rpartition('.')[2]):]}",
        ]
        if shutil.which("ninja"):
            configure += ["-G", "Ninja"]
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        subprocess.run(configure, check=True)
        subprocess.run([cmake, "--build", str(build_dir), "--parallel", jobs], check=True)
        if not output.is_file():
            raise RuntimeError(f"fusedopt: CMake finished but {output} is missing")


setup(
    name="fusedopt",
    version="0.2.0",
    description="Fused GPU optimizer steps (AdamW/AdamC, SGD/SGDC, Lion/LionC) with loss scaling, clipping and statistics",
    packages=["fusedopt", "fusedopt.algorithms", "fusedopt.engine", "fusedopt.triton_kernels",
              "fusedopt.triton_kernels.algorithms"],
    package_dir={"fusedopt": "python/fusedopt", "fusedopt.triton_kernels": "triton_kernels"},
    ext_modules=[CMakeExtension("fusedopt._C")],
    cmdclass={"build_ext": CMakeBuild},
    python_requires=">=3.10",
    # torch>=2.6: named parameters in torch.optim param groups ("param_names"), tensor lr in
    # schedulers and torch.amp.GradScaler's grad_scale/found_inf protocol.
    install_requires=["torch>=2.6", "numpy"],
    extras_require={
        # The main job, `python -m fusedopt demo`: its figure and progress bars (imported only
        # there, so the optimizers need neither).
        "demo": DEMO_REQUIRES,
        "triton": ["triton>=3.1"],
        "tensorboard": ["tensorboard"],
        # transformers: the block classifier's tests build GPT-2 / LLaMA models from configs.
        # The demo's requirements: tests/test_demo.py runs the demo.
        # accelerate (the Hugging Face Trainer needs it) and lightning: tests/test_integrations.py.
        "test": ["pytest", "triton>=3.1", "transformers", "accelerate>=1.1", "lightning>=2.6"] + DEMO_REQUIRES,
    },
    entry_points={"console_scripts": ["fusedopt-demo=fusedopt.demo:cli"]},
)
