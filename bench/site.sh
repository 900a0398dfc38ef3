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

# `spd_same_sha FILE SUMFILE`: whether FILE's sha256 is the one written in SUMFILE.
spd_same_sha() { [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$(cat "$2")" ]; }

# `spd_carried_model`, from the repository root: when the three parts of a model made by
# `bash bench/gpu_train_pdm.sh split` are all there (.carry1/ .carry2/ .carry3/, carried over consecutive device
# calls), joins them into /tmp/spd-target.gguf, checks the checksum, puts the carried gguf reader on PYTHONPATH and
# sets MODEL to the file. Returns 1 when the joined file does not match its checksum; 0 otherwise (MODEL untouched
# when the parts are not all there).
spd_carried_model() {
  [ -f .carry1/model.part ] && [ -f .carry2/model.part ] && [ -f .carry3/model.part ] || return 0
  cat .carry1/model.part .carry2/model.part .carry3/model.part > /tmp/spd-target.gguf
  spd_same_sha /tmp/spd-target.gguf .carry1/model.sha256 || return 1
  export PYTHONPATH="$PWD/.carry1/py${PYTHONPATH:+:$PYTHONPATH}"
  MODEL=/tmp/spd-target.gguf
}
