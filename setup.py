"""Build script: the pure-Python package plus the optional C++ extension ``spdkernels._C``.

The extension is built by CMake (found on PATH or from the ``cmake`` PyPI package in the build
environment) with ``sys.executable`` as the Python it targets. Set ``SPDKERNELS_SKIP_CPP=1`` to skip
it; a failed build is reported and skipped too, and the package then runs on its other backends.

A second, optional library ``spdkernels/_C_ops.so`` registers the CPU kernels with torch's dispatcher in
C++ (csrc/torch_ops/dispatch.cpp). It links libtorch, so it is built against the torch of the environment
the package is installed into: found by running that environment's Python with ``-I`` (which ignores the
PYTHONPATH of pip's isolated build environment), never installed by the build. No torch there, or
``SPDKERNELS_SKIP_TORCH_OPS=1``: it is skipped, and the ops run their Python CPU path. Its torch version is
written beside it (``_C_ops.json``); spdkernels loads it only under that version.
Nothing here imports torch, runs git or downloads anything.
"""

import json
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


def _target_torch():
    """(directory, version, C++11 ABI flag) of the torch the installed package will import, or None."""
    if os.environ.get("SPDKERNELS_SKIP_TORCH_OPS", "0") not in ("", "0"):
        return None
    code = ("import json, os, torch; print(json.dumps([os.path.dirname(torch.__file__), torch.__version__, "
            "int(torch._C._GLIBCXX_USE_CXX11_ABI)]))")
    try:
        r = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if r.returncode != 0:
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])


# Files the CMake build writes beside _C that setuptools does not know of: copied like _C in editable installs.
EXTRA_OUTPUTS = ("_C_ops.so", "_C_ops.json")


class CMakeBuild(build_ext):
    def _extra_files(self):
        """(built, in-place) paths of EXTRA_OUTPUTS."""
        built = os.path.join(self.build_lib, "spdkernels")
        inplace = self.get_finalized_command("build_py").get_package_dir("spdkernels")
        return [(os.path.join(built, n), os.path.join(inplace, n)) for n in EXTRA_OUTPUTS]

    def copy_extensions_to_source(self) -> None:
        super().copy_extensions_to_source()
        for src, dst in self._extra_files():
            if os.path.exists(src):
                self.copy_file(src, dst, level=self.verbose)
            elif os.path.exists(dst):  # left by an earlier build that had torch
                os.remove(dst)

    def get_outputs(self):
        return super().get_outputs() + [s for s, _ in self._extra_files() if os.path.exists(s)]

    def _get_output_mapping(self):
        yield from super()._get_output_mapping()
        if self.inplace:
            yield from ((s, d) for s, d in self._extra_files() if os.path.exists(s))

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
        torch_info = _target_torch()
        if torch_info:
            args += [f"-DSPD_TORCH_DIR={torch_info[0]}", f"-DSPD_TORCH_CXX11_ABI={torch_info[2]}"]
        if shutil.which("ninja"):
            args.append("-GNinja")
        cmake = _cmake_exe()
        subprocess.run([cmake, ext.sourcedir, *args], cwd=build_temp, check=True)
        jobs = str(os.cpu_count() or 1)
        build = [cmake, "--build", ".", "--config", cfg, "-j", jobs, "--target"]
        subprocess.run([*build, "spd_C"], cwd=build_temp, check=True)
        meta = out.parent / "_C_ops.json"
        meta.unlink(missing_ok=True)
        if not torch_info:
            print("spdkernels: no torch found for the target environment; _C_ops (the C++ dispatcher "
                  "registration) not built, the ops keep their Python CPU path", file=sys.stderr)
            return
        try:  # optional: its failure must not cost the _C module
            subprocess.run([*build, "spd_C_ops"], cwd=build_temp, check=True)
        except subprocess.CalledProcessError as e:
            if os.environ.get("SPDKERNELS_REQUIRE_CPP", "0") not in ("", "0"):
                raise
            print(f"spdkernels: WARNING: _C_ops not built ({e}); the ops keep their Python CPU path",
                  file=sys.stderr)
            return
        meta.write_text(json.dumps({"torch_version": torch_info[1], "cxx11_abi": torch_info[2]}) + "\n")


setup(
    packages=[
        "spdkernels",
        "spdkernels.ops",
        "spdkernels.reference",
        "spdkernels.runtime",
        "spdkernels.runtime.spd",
        "spdkernels.testing",
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
    # the PDM trained for the embedded model (spdkernels train-pdm), loaded by `spdkernels demo`
    package_data={"spdkernels.runtime": ["pdm/*/*.json", "pdm/*/*.safetensors", "pdm/*/*.md"]},
    ext_modules=[CMakeExtension("spdkernels._C", ROOT)],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
