#!/usr/bin/env bash
# make sanitize: build the C++ kernels (spdkernels._C) with AddressSanitizer + UBSan into build/sanitize and
# run the cpp backend's tests (the adapters' fused ops and the runtime's skinny / packed GEMM included) and the
# validation-off fuzzer against that build. Any out-of-bounds access,
# use after free or undefined behaviour (signed overflow, bad shift, misaligned load, ...) aborts the run.
#   PY=.venv/bin/python bash bench/sanitize.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
B=build/sanitize
rm -rf "$B/pkg"
mkdir -p "$B/cmake" "$B/pkg"
EXT=$("$PY" -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
read -r TORCH_DIR TORCH_VERSION ABI < <("$PY" -c "import os, torch; print(os.path.dirname(torch.__file__), \
  torch.__version__, int(torch._C._GLIBCXX_USE_CXX11_ABI))")
cmake -S . -B "$B/cmake" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DSPD_SANITIZE=ON \
  -DPython_EXECUTABLE="$(command -v "$PY" || echo "$PY")" -DSPD_TORCH_DIR="$TORCH_DIR" -DSPD_TORCH_CXX11_ABI="$ABI" \
  -DSPD_OUTPUT_DIR="$PWD/$B/pkg/spdkernels" -DSPD_OUTPUT_NAME="_C$EXT" >/dev/null
cmake --build "$B/cmake" --target spd_C -j "$(nproc)"
# the package's Python files next to the sanitized module, with the build record spdkernels checks before loading it
tar -C . --exclude='*.so' --exclude='_C.json' --exclude='__pycache__' -cf - spdkernels | tar -C "$B/pkg" -xf -
echo "{\"torch_version\": \"$TORCH_VERSION\", \"cxx11_abi\": $ABI}" > "$B/pkg/spdkernels/_C.json"
export SPDKERNELS_REQUIRE_CPP=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:allocator_may_return_null=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
# run from the copy: the working directory comes first on sys.path, ahead of the editable install
ROOT=$PWD
case "$PY" in /*) ;; *) PY="$ROOT/$PY" ;; esac
cd "$B/pkg"
where=$("$PY" -c "import spdkernels._C as c; print(c.__file__)")
case "$where" in "$ROOT/$B/pkg/"*) echo "sanitized module: $where" ;; *) echo "wrong module: $where" >&2; exit 1 ;; esac
"$PY" -m pytest -q -p no:cacheprovider -c "$ROOT/pyproject.toml" --rootdir "$ROOT" "$ROOT/tests/test_memory_safety.py" \
  "$ROOT/tests/test_verify_greedy.py" "$ROOT/tests/test_rejection_sample.py" "$ROOT/tests/test_tree_attention.py" \
  "$ROOT/tests/test_ops_framework.py" "$ROOT/tests/test_adapters_sglang.py" "$ROOT/tests/test_adapters_flashinfer.py" \
  "$ROOT/tests/test_adapters_vllm.py" "$ROOT/tests/test_adapters_transformers.py" "$ROOT/tests/test_runtime.py" \
  -k "cpp or memory or malformed or cpu or concurrent or fused or skinny or packed or widen or one_pass" "$@"
