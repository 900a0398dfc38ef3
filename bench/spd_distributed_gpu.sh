#!/usr/bin/env bash
# Distributed Speculative Pipeline Decoding with NCCL on GPUs: the same code path as the gloo/CPU runs
# (spdkernels/runtime/spd/distributed.py), launched by torchrun with n + 1 ranks. Rank r uses GPU r
# (LOCAL_RANK): NCCL needs one GPU per rank (a communicator refuses two ranks on one GPU), so a value of n
# needs n + 1 visible GPUs; an n with fewer is skipped with a message.
# NOT measured yet: no session that built it had a GPU; read its output critically the first time.
# Exit status: 0 when every step that ran succeeded (skipped n's do not count), 1 otherwise.
#
#   bash bench/spd_distributed_gpu.sh                 # n = 2 and 4, the demo's 8 prompts, greedy, 128 tokens
#   STAGES="4 8" MAX_TOKENS=256 bash bench/spd_distributed_gpu.sh
#   MODEL=/path/to/model.gguf PDM=/path/to/pdm bash bench/spd_distributed_gpu.sh   # another target + its PDM
#
# For each n it runs, on the same prompts: our autoregressive decoding (one process, one GPU) and
# `spdkernels generate --proposer spd --stages n --distributed --dist-backend nccl` under torchrun, then
# compares the outputs token for token (skipped, with the reason, when a run failed). Logs and JSON go to $OUT
# (default /tmp/spd-dist-gpu); each run's JSON is deleted first, so a failed run never compares stale output.
#
#   rehearsal: DEVICE=cpu STAGES=2 MAX_TOKENS=8 bash bench/spd_distributed_gpu.sh   (gloo on this CPU: checks the
#              paths, the package layout and the comparison, not the GPU).
set -uo pipefail
OUT=${OUT:-/tmp/spd-dist-gpu}
PY=${PY:-python3}
STAGES=${STAGES:-"2 4"}
MAX_TOKENS=${MAX_TOKENS:-128}
TIMEOUT=${TIMEOUT:-30}            # --dist-timeout: the first cycles include CUDA/NCCL warm-up
DEVICE=${DEVICE:-cuda}            # cpu: the rehearsal (gloo, this machine's .venv when there is one)
BACKEND=nccl; [ "$DEVICE" = cpu ] && BACKEND=gloo
TORCHRUN=${TORCHRUN:-torchrun}
export PYTHONUNBUFFERED=1
FAIL=0

# the package laid out as setup.py installs it (bench/site.sh), and every step run from that copy: from the
# repository root Python imports the repository's spdkernels/, which has no triton_kernels inside (the ops would
# fall back to their torch reference on the GPU)
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
[ -n "${MODEL:-}" ] && MODEL=$(realpath "$MODEL")
[ -n "${PDM:-}" ] && PDM=$(realpath "$PDM")
cd "$(dirname "$0")/.."
COMMIT=$(git rev-parse --short HEAD 2>/dev/null || true)
[ -x .venv/bin/python ] && [ "$PY" = python3 ] && [ "$DEVICE" = cpu ] && PY=$PWD/.venv/bin/python
[ -x .venv/bin/torchrun ] && [ "$DEVICE" = cpu ] && TORCHRUN=$PWD/.venv/bin/torchrun
. bench/site.sh
spd_site "$DEVICE"
cd "$SITE"

{
  date -u
  nvidia-smi -L || true
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpus', torch.cuda.device_count(), 'nccl', torch.distributed.is_nccl_available())"
  echo "commit $COMMIT"
  "$PY" -c "import spdkernels, spdkernels.triton_kernels; print(spdkernels.__file__)"
} 2>&1 | tee "$OUT/env.txt"

# the demo's prompts, one JSON list
"$PY" -c "import json; from spdkernels.runtime.demo import SUITE; print(json.dumps([p for _, p in SUITE]))" > "$OUT/prompts.json"
MODEL_ARGS=()
[ -n "${MODEL:-}" ] && MODEL_ARGS+=(--model "$MODEL")
PDM_ARGS=()
[ -n "${PDM:-}" ] && PDM_ARGS+=(--pdm "$PDM")

GPUS=0
if [ "$DEVICE" != cpu ]; then
  GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)" 2>/dev/null || echo 0)
  echo "GPUs visible: $GPUS (NCCL: one per rank)" | tee -a "$OUT/env.txt"
fi

# autoregressive baseline on one GPU: the same prompts through our Engine
rm -f "$OUT/ar.json"
"$PY" - "$OUT" "$MAX_TOKENS" "${MODEL:-}" "$DEVICE" <<'EOF' 2>&1 | tee "$OUT/ar.txt"
import json, sys, time
import torch
from spdkernels.runtime import Engine, LlamaModel, Request, SamplingParams, load_checkpoint
out, max_tokens, model, device = sys.argv[1], int(sys.argv[2]), sys.argv[3] or None, sys.argv[4]
ck = load_checkpoint(model)
m = LlamaModel(ck.config, ck.state_dict, device=device)
tok = ck.tokenizer
prompts = json.load(open(f"{out}/prompts.json"))
outs, toks, dec = [], 0, 0.0
for p in prompts:
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": p}]))
    res, met = Engine(m, None).generate([Request(ids, SamplingParams(max_new_tokens=max_tokens))])
    outs.append(res[0].output_ids)
    toks += len(res[0].output_ids)
    dec += met.wall_s - met.prefill_s
print(f"autoregressive: {toks / dec:.1f} tok/s decode on {torch.cuda.get_device_name(0) if device != 'cpu' else 'cpu'}")
json.dump(dict(outputs=outs, tokens_per_s=toks / dec), open(f"{out}/ar.json", "w"))
EOF
AR_RC=${PIPESTATUS[0]}
if [ "$AR_RC" -ne 0 ] || [ ! -s "$OUT/ar.json" ]; then
  echo "autoregressive baseline failed (exit code $AR_RC): no comparisons" | tee -a "$OUT/ar.txt"
  FAIL=1
fi

for N in $STAGES; do
  echo "=== n=$N: $((N + 1)) ranks, $BACKEND" | tee "$OUT/spd-n$N.txt"
  rm -f "$OUT/spd-n$N.json"
  if [ "$BACKEND" = nccl ] && [ "$GPUS" -lt $((N + 1)) ]; then
    echo "n=$N: skipped: NCCL needs $((N + 1)) GPUs (one per rank), $GPUS visible" | tee -a "$OUT/spd-n$N.txt"
    continue
  fi
  "$TORCHRUN" --standalone --nproc-per-node=$((N + 1)) -m spdkernels.runtime.cli generate \
    --prompt-file "$OUT/prompts.json" --max-tokens "$MAX_TOKENS" --proposer spd --stages "$N" \
    --distributed --dist-backend "$BACKEND" --dist-timeout "$TIMEOUT" --no-progress \
    "${MODEL_ARGS[@]}" "${PDM_ARGS[@]}" --json "$OUT/spd-n$N.json" 2>&1 | tee -a "$OUT/spd-n$N.txt"
  RC=${PIPESTATUS[0]}
  echo "torchrun exit code: $RC" | tee -a "$OUT/spd-n$N.txt"
  if [ "$RC" -ne 0 ] || [ ! -s "$OUT/spd-n$N.json" ]; then
    echo "n=$N: comparison skipped: torchrun exited with code $RC$([ -s "$OUT/spd-n$N.json" ] || echo ', no JSON written')" \
      | tee -a "$OUT/spd-n$N.txt"
    FAIL=1
    continue
  fi
  [ -s "$OUT/ar.json" ] || continue
  "$PY" - "$OUT" "$N" <<'EOF' 2>&1 | tee -a "$OUT/spd-n$N.txt"
import json, sys
out, n = sys.argv[1], sys.argv[2]
ar = json.load(open(f"{out}/ar.json"))
spd = json.load(open(f"{out}/spd-n{n}.json"))
same = sum(a == r["output_ids"] for a, r in zip(ar["outputs"], spd["results"]))
tps = spd["metrics"]["decode_tokens_per_s"]
print(f"n={n}: identical to autoregressive {same}/{len(ar['outputs'])}; SPD {tps:.1f} tok/s decode vs AR "
      f"{ar['tokens_per_s']:.1f}: {tps / ar['tokens_per_s']:.2f}x")
sys.exit(0 if same == len(ar["outputs"]) == len(spd["results"]) else 3)
EOF
  CMP_RC=${PIPESTATUS[0]}
  if [ "$CMP_RC" -ne 0 ]; then
    echo "n=$N: comparison failed (exit code $CMP_RC: outputs differ, or the JSON could not be read)" | tee -a "$OUT/spd-n$N.txt"
    FAIL=1
  fi
done
[ "$FAIL" -eq 0 ] && echo "all steps succeeded" || echo "some step failed (see above)"
exit "$FAIL"
