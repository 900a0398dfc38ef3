#!/usr/bin/env bash
# The GPU checks of the open issues in one command, for a session that is lent a GPU machine (the device
# tool: one call, ~10 minutes, its files come back from $OUT). Not yet run on a GPU: no session so far was
# lent one, so read its output critically the first time.
#
#   device run:  bash bench/gpu_session.sh            (timeout_s 600; the steps below stop themselves earlier)
#
# What it does, in the repository root on that machine:
#   1. records the device and the versions (nvidia-smi, torch, triton) in $OUT/env.txt;
#   2. makes the package importable without building or installing anything (that machine has torch and
#      Triton but no network): a copy of the tree laid out as setup.py installs it (triton_kernels/, bench/
#      and nki_kernels/ inside spdkernels/), on PYTHONPATH; the CPU extension is not needed on a GPU;
#   3. runs the op tests on CUDA (Triton compiled for real, not interpreted: the chi-square distribution
#      tests of the Triton rejection sampler run only there), log in $OUT/pytest.txt;
#   4. runs spd-bench on CUDA for every op (CUDA-graph replay where capturable), writing
#      $OUT/bench-gpu.{txt,json,png}: the figures the issues' GPU goals are judged on. Copy them to
#      bench/results/ with the device in the name, and quote them in the README with this command.
set -uo pipefail
OUT=${OUT:-/tmp/spd-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
TEST_BUDGET=${TEST_BUDGET:-300}   # seconds for the tests, so the bench always gets its turn
BENCH_BUDGET=${BENCH_BUDGET:-200}
DEVICE=${DEVICE:-cuda}            # (DEVICE=cpu BENCH_ARGS="--shapes tiny" TEST_BUDGET=30: a smoke run on a CPU)
BENCH_ARGS=${BENCH_ARGS:-}

{
  date -u
  nvidia-smi -L || true
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,driver_version --format=csv || true
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'device', torch.cuda.get_device_name(0))"
} 2>&1 | tee "$OUT/env.txt"

SITE=$(mktemp -d)
cp -r spdkernels "$SITE/"
rm -f "$SITE"/spdkernels/_C*.so "$SITE"/spdkernels/_C_ops.json  # CPU builds from this machine, if any travelled
cp -r triton_kernels "$SITE/spdkernels/triton_kernels"
cp -r nki_kernels "$SITE/spdkernels/nki_kernels"
cp -r bench "$SITE/spdkernels/bench"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import spdkernels; print(spdkernels.__file__, 'backends on $DEVICE:', spdkernels.available_backends('$DEVICE'))" 2>&1 | tee -a "$OUT/env.txt"

timeout "$TEST_BUDGET" "$PY" -m pytest -q -p no:cacheprovider tests/test_verify_greedy.py \
  tests/test_rejection_sample.py tests/test_tree_attention.py tests/test_tree_utils.py tests/test_ops_framework.py \
  2>&1 | tee "$OUT/pytest.txt" | tail -n 25
echo "pytest exit status: ${PIPESTATUS[0]} (124: stopped at ${TEST_BUDGET} s)" | tee -a "$OUT/pytest.txt"

timeout "$BENCH_BUDGET" "$PY" -m spdkernels.bench --device "$DEVICE" --no-progress $BENCH_ARGS \
  --json "$OUT/bench-gpu.json" --plot "$OUT/bench-gpu.png" 2>&1 | tee "$OUT/bench-gpu.txt"
echo "spd-bench exit status: ${PIPESTATUS[0]} (124: stopped at ${BENCH_BUDGET} s)" | tee -a "$OUT/bench-gpu.txt"
