#!/usr/bin/env bash
# Distributed Speculative Pipeline Decoding with NCCL on GPUs: the same code path as the gloo/CPU runs
# (spdkernels/runtime/spd/distributed.py), launched by torchrun with n + 1 ranks. Rank r uses GPU
# r % (GPUs visible): one GPU per rank on a machine with >= n + 1 GPUs, or several ranks sharing GPUs.
# NOT measured yet: no session that built it had a GPU; read its output critically the first time.
#
#   bash bench/spd_distributed_gpu.sh                 # n = 2 and 4, the demo's 8 prompts, greedy, 128 tokens
#   STAGES="4 8" MAX_TOKENS=256 bash bench/spd_distributed_gpu.sh
#   MODEL=/path/to/model.gguf PDM=/path/to/pdm bash bench/spd_distributed_gpu.sh   # another target + its PDM
#
# For each n it runs, on the same prompts: our autoregressive decoding (one process, one GPU) and
# `spdkernels generate --proposer spd --stages n --distributed --dist-backend nccl` under torchrun, then
# compares the outputs token for token. Logs and JSON go to $OUT (default /tmp/spd-dist-gpu).
#
#   rehearsal: DEVICE=cpu STAGES=2 MAX_TOKENS=8 bash bench/spd_distributed_gpu.sh   (gloo on this CPU: checks the
#              paths, the package layout and the comparison, not the GPU). Rehearsed on the 2-core machine:
#              0.9 min, the package imported from the laid-out copy, torchrun exit 0, 8/8 identical.
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

# autoregressive baseline on one GPU: the same prompts through our Engine
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

for N in $STAGES; do
  echo "=== n=$N: $((N + 1)) ranks, $BACKEND" | tee "$OUT/spd-n$N.txt"
  "$TORCHRUN" --standalone --nproc-per-node=$((N + 1)) -m spdkernels.runtime.cli generate \
    --prompt-file "$OUT/prompts.json" --max-tokens "$MAX_TOKENS" --proposer spd --stages "$N" \
    --distributed --dist-backend "$BACKEND" --dist-timeout "$TIMEOUT" --no-progress \
    "${MODEL_ARGS[@]}" "${PDM_ARGS[@]}" --json "$OUT/spd-n$N.json" 2>&1 | tee -a "$OUT/spd-n$N.txt"
  echo "torchrun exit code: ${PIPESTATUS[0]}" | tee -a "$OUT/spd-n$N.txt"
  "$PY" - "$OUT" "$N" <<'EOF' 2>&1 | tee -a "$OUT/spd-n$N.txt"
import json, sys
out, n = sys.argv[1], sys.argv[2]
ar = json.load(open(f"{out}/ar.json"))
spd = json.load(open(f"{out}/spd-n{n}.json"))
same = sum(a == r["output_ids"] for a, r in zip(ar["outputs"], spd["results"]))
tps = spd["metrics"]["decode_tokens_per_s"]
print(f"n={n}: identical to autoregressive {same}/{len(ar['outputs'])}; SPD {tps:.1f} tok/s decode vs AR "
      f"{ar['tokens_per_s']:.1f}: {tps / ar['tokens_per_s']:.2f}x")
EOF
done
