#!/usr/bin/env bash
# bench/compile_check.py under another Triton release than the installed one: the GPU machines bring their own (the
# lent H200 had Triton 3.6 where this project installs 3.9), and two faults of Triton 3.6 reached the GPU that the
# check under 3.9 could not show (bench/results/gpu-h200-README.md). That release goes into its own virtual
# environment beside torch from .venv (the check only compiles: no GPU, no CUDA torch needed).
#
#   bash bench/compile_check_triton.sh 3.6.0                 # every specialisation, sm_90 and sm_80
#   bash bench/compile_check_triton.sh 3.6.0 --arch 90 --quick
#   bash bench/compile_check_triton.sh 3.6.0 --quick --errors-only   (CI: compile errors fail, known spills do not)
#
# The table goes to bench/results/compile-check-triton<version>.md (--md to change it); the exit status is the
# check's (1 on a compile error, a spilled byte or too much shared memory).
set -euo pipefail
VER=${1:?usage: $0 TRITON_VERSION [compile_check arguments]}
shift
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PY:-$ROOT/.venv/bin/python}
VENV=${VENV:-/tmp/spd-triton-$VER}
if [ ! -x "$VENV/bin/python" ]; then  # the same interpreter as .venv's, so that its torch imports there
  "$("$PY" -c 'import sys; print(sys._base_executable)')" -m venv "$VENV"
  "$VENV/bin/pip" install -q "triton==$VER"
fi
TRITON_SP=$("$VENV/bin/python" -c "import site; print(site.getsitepackages()[0])")
TORCH_SP=$("$PY" -c "import site; print(site.getsitepackages()[0])")
. bench/site.sh
spd_site cpu  # the layout setup.py installs (spdkernels.triton_kernels, spdkernels.bench)
# this Triton first, then the package copy, then .venv's torch; the repository root last (compile_check reads the
# benchmark shapes from bench/)
export PYTHONPATH="$TRITON_SP:$SITE:$TORCH_SP:$ROOT"
cd "$SITE"
"$VENV/bin/python" -c "import triton; assert triton.__version__ == '$VER', triton.__version__"
exec "$VENV/bin/python" -m spdkernels.bench.compile_check --md "$ROOT/bench/results/compile-check-triton$VER.md" "$@"
