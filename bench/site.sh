# Sourced by the device scripts (bench/gpu_session.sh, bench/gpu_train_pdm.sh, bench/spd_distributed_gpu.sh), from
# the repository root:
# `spd_site DEVICE` lays the package out as setup.py installs it (triton_kernels/, nki_kernels/ and bench/ inside
# spdkernels/) in a fresh temporary folder, puts that folder first on PYTHONPATH and sets SITE to it. On a GPU the
# CPU extension built here is left out (it is built for this machine's Python and CPU). Run Python from "$SITE":
# `python -m` puts the working folder first on the path, and from the repository root it would import the
# repository's spdkernels/, which has no triton_kernels inside.
spd_site() {
  SITE=$(mktemp -d)
  cp -r spdkernels "$SITE/"
  if [ "$1" != cpu ]; then rm -f "$SITE"/spdkernels/_C*.so "$SITE"/spdkernels/_C.json; fi
  cp -r triton_kernels "$SITE/spdkernels/triton_kernels"
  cp -r nki_kernels "$SITE/spdkernels/nki_kernels"
  cp -r bench "$SITE/spdkernels/bench"
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
}
