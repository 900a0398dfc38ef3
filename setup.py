"""Build script: the pure-Python package plus the optional C++ extension ``spdkernels._C``.

The extension is built by CMake (found on PATH or from the ``cmake`` PyPI package in the build
environment) with ``sys.executable`` as the Python it targets. Set ``SPDKERNELS_SKIP_CPP=1`` to skip
it; a failed build is reported and skipped too, and the package then runs on its other backends.
Nothing here imports torch, runs git or downloads anything.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str, sourcedir: Path):
        super().__init__(name, sources=[])
        self.sourcedir = str(sourcedir)


def _cmake_exe() -> str:
    exe = shutil.which("cmake")
    if exe:
        return exe
    try:  # the `cmake` wheel from the build-system table
        import cmake  # type: ignore

        return os.path.join(cmake.CMAKE_BIN_DIR, "cmake")
    except ImportError as e:  # pragma: no cover - depends on the build environment
        raise RuntimeError("cmake not found") from e


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        if os.environ.get("SPDKERNELS_SKIP_CPP", "0") not in ("", "0"):
            print("spdkernels: SPDKERNELS_SKIP_CPP set, not building the C++ extension", file=sys.stderr)
            return
        try:
            self._build_cmake(ext)
        except Exception as e:  # the package works without the extension: say so, do not fail
            if os.environ.get("SPDKERNELS_REQUIRE_CPP", "0") not in ("", "0"):
                raise
            print(f"spdkernels: WARNING: C++ extension not built ({e}); "
                  "the cpp backend will be unavailable", file=sys.stderr)

    def _build_cmake(self, ext: CMakeExtension) -> None:
        import pybind11

        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        out.parent.mkdir(parents=True, exist_ok=True)
        build_temp = Path(self.build_temp).resolve() / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)
        cfg = "Debug" if self.debug else "Release"
        args = [
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DSPD_OUTPUT_DIR={out.parent}",
            f"-DSPD_OUTPUT_NAME={out.name}",
        ]
        if shutil.which("ninja"):
            args.append("-GNinja")
        cmake = _cmake_exe()
        subprocess.run([cmake, ext.sourcedir, *args], cwd=build_temp, check=True)
        jobs = str(os.cpu_count() or 1)
        subprocess.run([cmake, "--build", ".", "--config", cfg, "-j", jobs], cwd=build_temp, check=True)


setup(
    packages=[
        "spdkernels",
        "spdkernels.ops",
        "spdkernels.reference",
        "spdkernels.runtime",
        "spdkernels.triton_kernels",
        "spdkernels.nki_kernels",
        "spdkernels.bench",
    ],
    # The kernel folders keep their design-card names at the top of the repository but install inside
    # the spdkernels namespace: the import names `triton_kernels` and `nki_kernels` belong to other
    # distributions that serving environments install.
    package_dir={
        "spdkernels": "spdkernels",
        "spdkernels.triton_kernels": "triton_kernels",
        "spdkernels.nki_kernels": "nki_kernels",
        "spdkernels.bench": "bench",
    },
    ext_modules=[CMakeExtension("spdkernels._C", ROOT)],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
