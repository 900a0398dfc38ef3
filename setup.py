"""Build script: the pure-Python package plus the C++ extension ``spdkernels._C`` (the CPU kernels, registered
with torch's dispatcher; csrc/ops.cpp).

The extension links libtorch, so it is built against the torch of the environment the package is installed
into: found by running that environment's Python with ``-I`` (which ignores the PYTHONPATH of pip's isolated
build environment), never installed by the build. CMake (found on PATH or from the ``cmake`` PyPI package in the
build environment) builds it with ``sys.executable`` as the Python it targets.

The package runs without the extension (the ops then take their pure-torch path on CPU), so a failed build does
not fail the install unless ``SPDKERNELS_REQUIRE_CPP=1``; it is reported at the end of the build in a banner and
recorded in ``spdkernels/_C.json``, which ``spdkernels`` reads to say why the cpp backend is unavailable
(``spdkernels._cpp.load_error()``, the warning at first use). Build frontends that build in an environment of
their own (``python -m build``, ``uv``) see no torch there: install torch first and build with
``--no-build-isolation``; pip's own isolation works (``-I`` ignores its PYTHONPATH overlay). On success the
same file records the torch version the extension was built for; spdkernels loads the extension only under that
version. ``SPDKERNELS_SKIP_CPP=1`` skips
the build. Nothing here imports torch, runs git or downloads anything.
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
META = "_C.json"  # written beside the extension: the torch it was built for, or why it was not built


class CMakeExtension(Extension):
    def __init__(self, name: str, sourcedir: Path):
        super().__init__(name, sources=[], optional=True)  # optional: a failed build leaves no file to copy
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
    """(directory, version, C++11 ABI flag) of the torch the installed package will import; raises if none."""
    code = ("import json, os, torch; print(json.dumps([os.path.dirname(torch.__file__), torch.__version__, "
            "int(torch._C._GLIBCXX_USE_CXX11_ABI)]))")
    r = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError("no torch importable by the target environment's Python "
                           f"({(r.stderr.strip().splitlines() or ['?'])[-1]}); install torch first")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0")


class CMakeBuild(build_ext):
    def _meta_paths(self):
        """(built, in-place) paths of META: setuptools does not know the file, so it is copied like _C."""
        built = os.path.join(self.build_lib, "spdkernels", META)
        inplace = os.path.join(self.get_finalized_command("build_py").get_package_dir("spdkernels"), META)
        return built, inplace

    def copy_extensions_to_source(self) -> None:
        super().copy_extensions_to_source()
        src, dst = self._meta_paths()
        if os.path.exists(src):
            self.copy_file(src, dst, level=self.verbose)

    def get_outputs(self):
        src, _ = self._meta_paths()
        return super().get_outputs() + ([src] if os.path.exists(src) else [])

    def _get_output_mapping(self):
        yield from super()._get_output_mapping()
        src, dst = self._meta_paths()
        if self.inplace and os.path.exists(src):
            yield src, dst

    def _write_meta(self, meta: dict) -> None:
        path = Path(self._meta_paths()[0])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(meta) + "\n")

    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        if _flag("SPDKERNELS_SKIP_CPP"):
            print("spdkernels: SPDKERNELS_SKIP_CPP set, not building the C++ extension", file=sys.stderr)
            self._write_meta({"error": "not built: SPDKERNELS_SKIP_CPP was set"})
            return
        try:
            torch_info = self._build_cmake(ext)
        except Exception as e:  # the package works without the extension: say so loudly, do not fail
            self._write_meta({"error": f"the build failed: {e}"})
            if _flag("SPDKERNELS_REQUIRE_CPP"):
                raise
            bar = "!" * 100
            print(f"{bar}\nspdkernels: WARNING: the C++ extension was NOT built ({e}).\nThe cpp backend is "
                  "unavailable; the ops run their pure-torch path on CPU. The compiler output is above.\n"
                  f"Set SPDKERNELS_REQUIRE_CPP=1 to make this an error.\n{bar}", file=sys.stderr)
            return
        self._write_meta({"torch_version": torch_info[1], "cxx11_abi": torch_info[2]})

    def _build_cmake(self, ext: CMakeExtension):
        torch_info = _target_torch()
        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        out.parent.mkdir(parents=True, exist_ok=True)
        build_temp = Path(self.build_temp).resolve() / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)
        cfg = "Debug" if self.debug else "Release"
        args = [
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DSPD_OUTPUT_DIR={out.parent}",
            f"-DSPD_OUTPUT_NAME={out.name}",
            f"-DSPD_TORCH_DIR={torch_info[0]}",
            f"-DSPD_TORCH_CXX11_ABI={torch_info[2]}",
        ]
        if shutil.which("ninja"):
            args.append("-GNinja")
        cmake = _cmake_exe()
        subprocess.run([cmake, ext.sourcedir, *args], cwd=build_temp, check=True)
        jobs = str(os.cpu_count() or 1)
        subprocess.run([cmake, "--build", ".", "--config", cfg, "-j", jobs, "--target", "spd_C"], cwd=build_temp,
                       check=True)
        return torch_info


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
