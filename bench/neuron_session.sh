#!/usr/bin/env bash
# The NKI checks in one command, for an AWS Trainium instance (trn1 or trn2) with the Neuron driver and runtime
# (e.g. a Neuron Deep Learning AMI). Prepared, NOT YET RUN: no Trainium machine has run it, so read its output
# critically the first time; nothing in the README claims results from it until it has.
#
#   bash bench/neuron_session.sh            (OUT=<dir> for the results; ~15 minutes, mostly installs and compiles)
#
# What it does, in the repository root:
#   1. records the machine (neuron-ls, instance type, kernel) and, after step 2, the versions in $OUT/env.txt;
#   2. installs the Neuron packages from the Neuron package index (never PyPI: PyPI's nki / neuronx-cc are
#      placeholders raising ImportError("WRONG PACKAGE")) into a fresh venv, then this package without its C++
#      extension;
#   3. runs the op tests' NKI cases on the official CPU simulator (SPDKERNELS_NKI_SIMULATE=1: nki.simulate
#      runs the same kernel source the emulation runs), then the emulation's own tests, log in $OUT/pytest-*.txt;
#   4. runs each op on the Neuron device (XLA tensors, the registry's nki backend, @nki.jit) against the torch
#      reference on CPU, with wall-clock times around xm.wait_device_ops(), into $OUT/neuron-device.json;
#   5. writes spd-bench's bytes model for the NKI kernels next to those times ($OUT/bench-nki-model.{txt,json}).
# Every JSON names the device (neuron-ls) and the versions.
set -uo pipefail
OUT=${OUT:-/tmp/spd-neuron-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
VENV=${VENV:-$OUT/venv}
NEURON_INDEX=${NEURON_INDEX:-https://pip.repos.neuron.amazonaws.com}
TEST_BUDGET=${TEST_BUDGET:-1500}

{
  date -u
  neuron-ls 2>&1 || echo "neuron-ls: not found (is this a Trainium instance with the Neuron driver?)"
  curl -s -m 2 http://169.254.169.254/latest/meta-data/instance-type && echo || true
  uname -a
} 2>&1 | tee "$OUT/env.txt"

python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
"$PY" -m pip install -q --extra-index-url "$NEURON_INDEX" "neuronx-cc==2.*" "torch-neuronx==2.9.*" nki 2>&1 \
  | tail -n 5 | tee -a "$OUT/env.txt"
SPDKERNELS_SKIP_CPP=1 "$PY" -m pip install -q -e '.[test,bench]' 2>&1 | tail -n 5 | tee -a "$OUT/env.txt"
"$PY" - <<'PYEOF' 2>&1 | tee -a "$OUT/env.txt"
import importlib.metadata as md
import nki, torch
import spdkernels
for d in ("nki", "neuronx-cc", "torch-neuronx", "torch", "torch-xla"):
    try:
        print(d, md.version(d))
    except md.PackageNotFoundError:
        print(d, "not installed")
print("nki.simulate:", hasattr(nki, "simulate"), "| nki backend on xla:", spdkernels.available_backends("xla"))
PYEOF

# 3. the official simulator, then the emulation's own tests (these run anywhere)
SPDKERNELS_NKI_SIMULATE=1 timeout "$TEST_BUDGET" "$PY" -m pytest -q -p no:cacheprovider -k nki \
  tests/test_verify_greedy.py tests/test_rejection_sample.py tests/test_tree_attention.py tests/test_nki_kernels.py \
  2>&1 | tee "$OUT/pytest-simulator.txt" | tail -n 25
echo "simulator pytest exit status: ${PIPESTATUS[0]}" | tee -a "$OUT/pytest-simulator.txt"
timeout 600 "$PY" -m pytest -q -p no:cacheprovider tests/test_nki_emulator.py tests/test_nki_kernels.py \
  2>&1 | tee "$OUT/pytest-emulation.txt" | tail -n 5

# 4. the device: every op through the registry's nki backend on XLA tensors, checked against the reference
OUT="$OUT" timeout 1200 "$PY" - <<'PYEOF' 2>&1 | tee "$OUT/neuron-device.txt"
import json, os, subprocess, time
import torch
import torch_xla.core.xla_model as xm
import spdkernels
from spdkernels import reference
from spdkernels.testing import random_draft_batch

dev = xm.xla_device()
device_name = subprocess.run(["neuron-ls"], capture_output=True, text=True).stdout.strip()[:2000]
rows = []

def timed(fn, reps=20):
    fn(); xm.wait_device_ops()
    ts = []
    for _ in range(reps):
        t = time.perf_counter(); fn(); xm.wait_device_ops(); ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2] * 1e3

spdkernels.set_validation(False)
for R, k, V, tree_ in ((16, 4, 32000, False), (16, 8, 32000, True), (64, 4, 128256, False)):
    b = random_draft_batch([k] * R, V, tree=tree_, dtype=torch.bfloat16, gen=torch.Generator().manual_seed(0))
    args = [x.to(dev) if isinstance(x, torch.Tensor) else x for x in b.args()]
    want = reference.verify_greedy(*b.args())
    row = {"op": "verify_greedy", "case": f"R{R}-k{k}-V{V}-bf16-{'tree' if tree_ else 'chain'}"}
    try:
        with spdkernels.use_backend("nki"):
            got = spdkernels.verify_greedy(*args[:4], max_depth=args[4])
            row["exact"] = all(torch.equal(g.cpu(), w) for g, w in zip(got, want))
            row["median_ms_wall"] = timed(lambda: spdkernels.verify_greedy(*args[:4], max_depth=args[4]))
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {e}"[:500]
    rows.append(row); print(row)

for R, k, V in ((16, 4, 1000), (16, 4, 4096)):
    b = random_draft_batch([k] * R, V, tree=True, gen=torch.Generator().manual_seed(1))
    u = torch.rand(b.N + R, generator=torch.Generator().manual_seed(2)).clamp(1e-6, 1 - 1e-6)
    kw = dict(temperature=torch.full((R,), 0.8), top_k=torch.full((R,), 50, dtype=torch.int32),
              top_p=torch.full((R,), 0.9), uniforms=u)
    want = reference.rejection_sample(*b.args()[:4], None, kw["temperature"], kw["top_k"], kw["top_p"], u, b.max_depth)
    dargs = [x.to(dev) for x in b.args()[:3]]
    dkw = {n: v.to(dev) for n, v in kw.items()}
    row = {"op": "rejection_sample", "case": f"R{R}-k{k}-V{V}-tree-topk50-topp0.9"}
    try:
        with spdkernels.use_backend("nki"):
            call = lambda: spdkernels.rejection_sample(*dargs, parents=b.parents.to(dev), max_depth=b.max_depth, **dkw)
            got = call()
            row["requests_equal_to_reference"] = int(((got[0].cpu() == want[0]).all(1) & (got[1].cpu() == want[1])).sum())
            row["requests"] = R
            row["median_ms_wall"] = timed(call)
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {e}"[:500]
    rows.append(row); print(row)

from spdkernels import tree as T
for R, ctx, ql in ((1, 4096, 8), (8, 4096, 8)):
    g = torch.Generator().manual_seed(3)
    bs, Hq, Hkv, D = 16, 32, 8, 128
    L = ctx + ql; nbr = (L + bs - 1) // bs
    bt = torch.randperm(R * nbr, generator=g).to(torch.int32).view(R, nbr)
    kc = torch.randn(R * nbr, bs, Hkv, D, generator=g).bfloat16(); vc = torch.randn(R * nbr, bs, Hkv, D, generator=g).bfloat16()
    q = torch.randn(R * ql, Hq, D, generator=g).bfloat16()
    par = torch.tensor([-1] + list(range(ql - 2)) if ql > 1 else [], dtype=torch.int32).repeat(R)
    mask = T.build_tree_mask(par, torch.arange(R + 1, dtype=torch.int32) * (ql - 1), ql)
    cpu_args = [q, kc, vc, bt, torch.full((R,), L, dtype=torch.int32), torch.arange(R + 1, dtype=torch.int32) * ql, mask]
    want = reference.tree_attention(*cpu_args).float()
    dargs = [a.to(dev) for a in cpu_args]
    row = {"op": "tree_attention", "case": f"R{R}-ctx{ctx}-q{ql}-bf16-H{Hq}/{Hkv}-D{D}"}
    try:
        with spdkernels.use_backend("nki"):
            got = spdkernels.tree_attention(*dargs).cpu().float()
            row["rel_rms_error"] = float((got - want).norm() / want.norm())
            row["median_ms_wall"] = timed(lambda: spdkernels.tree_attention(*dargs))
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {e}"[:500]
    rows.append(row); print(row)

path = os.path.join(os.environ["OUT"], "neuron-device.json")
with open(path, "w") as f:
    json.dump({"device": device_name, "note": "wall-clock medians around xm.wait_device_ops(), including launch "
               "and host-side layout work", "rows": rows}, f, indent=1)
print("wrote", path)
PYEOF

# 5. the bytes model of the same kernels (labelled a model by spd-bench itself)
"$PY" -m spdkernels.bench --backend nki --no-progress --json "$OUT/bench-nki-model.json" 2>&1 \
  | tee "$OUT/bench-nki-model.txt"
echo "done: $OUT"
