# make test  — set up .venv if needed, build the extension, run pytest, the fallback suite (the
#              pure-PyTorch references), the C++ tests and the CUDA compile check
# make demo  — the main job on the bundled default data
# make bench — the pytest-benchmark suite
# make bench-gpu — on a CUDA machine: the CUDA tests, the self-check and the GPU benchmarks, ~10 min,
#              appended to benchmarks/RESULTS.md (benchmarks/gpu.py; without a GPU it says so and exits 0)
# make theory — the paper's Appendix A experiments (Lemma 2, Tables 3 and 4)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install test test-python test-fallback test-cpp cuda-check bench bench-gpu demo theory clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch is installed only when absent: on these machines `torch==2.13.0` is a local CPU wheel, and
# letting pip resolve a plain `torch` would pull a multi-GB CUDA build.
$(VENV)/.deps: $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install numpy scipy safetensors tqdm pytest pytest-benchmark matplotlib scikit-learn mnist1d torchmetrics transformers
	touch $@

# The compiled core includes no torch headers, so any build mode works; editable for development.
$(VENV)/.built: $(VENV)/.deps setup.py pyproject.toml $(wildcard csrc/*/*.cpp csrc/*/*.hpp csrc/ops/*/*.cpp csrc/ops/*/*.hpp csrc/ops/*/*.cu)
	$(PY) -m pip install --no-build-isolation --no-deps -e .
	touch $@

install: $(VENV)/.built

# Every suite always runs; the target fails at the end if any failed.
test: install
	@status=0; \
	$(MAKE) --no-print-directory test-python || status=1; \
	$(MAKE) --no-print-directory test-fallback || status=1; \
	$(MAKE) --no-print-directory test-cpp || status=1; \
	$(MAKE) --no-print-directory cuda-check || status=1; \
	if [ $$status -ne 0 ]; then echo "make test: a suite failed (see above)"; fi; \
	exit $$status

test-python: install
	$(PY) -m pytest -q tests

# What runs where the extension cannot be built or loaded: the op, LAP and matching tests with
# STARFAST_NO_EXTENSION=1 (starfast/extension.py), i.e. on the pure-PyTorch references. Tests of
# the extension itself (marked needs_extension) are skipped there, saying so.
FALLBACK_TESTS := tests/test_ops.py tests/test_lap.py tests/test_matching.py
test-fallback: install
	STARFAST_NO_EXTENSION=1 $(PY) -m pytest -q $(FALLBACK_TESTS)

test-cpp:
	cmake -S . -B build/cmake -DCMAKE_BUILD_TYPE=Release >/dev/null
	cmake --build build/cmake -j 2
	ctest --test-dir build/cmake --output-on-failure

# The CUDA kernels compile with nvcc (for sm_90, warnings as errors) wherever a toolkit is present:
# $CUDA_HOME/bin/nvcc, nvcc on PATH, or /usr/local/cuda. No GPU is needed (nor used).
NVCC := $(firstword $(wildcard $(CUDA_HOME)/bin/nvcc) $(shell command -v nvcc 2>/dev/null) $(wildcard /usr/local/cuda/bin/nvcc))
cuda-check:
ifeq ($(NVCC),)
	@echo "cuda-check skipped: no CUDA toolkit"
else
	@mkdir -p build/cuda-check
	@for source in csrc/ops/cuda/*.cu; do \
		echo "$(NVCC) -c $$source"; \
		$(NVCC) -std=c++17 -O3 -arch=sm_90 -Werror all-warnings -Xcompiler -Wall,-Wextra,-Werror \
			-c $$source -o build/cuda-check/$$(basename $$source .cu).o || exit 1; \
	done; echo "cuda-check: the CUDA kernels compile (sm_90)"
endif

bench: install
	$(PY) -m pip install lapx >/dev/null 2>&1 || echo "lapx not installable: its column is skipped"
	$(PY) -m pytest benchmarks -q --benchmark-columns=median,iqr,rounds --benchmark-sort=name

bench-gpu: install
	$(PY) benchmarks/gpu.py

# The default main job, no tuning flags: mlp (3 hidden layers of 24) on digits, 10 sources,
# 5 held-out, 3 stars trained 90 epochs; the barrier table and the verdict line (README, "The main job").
demo: install
	$(PY) -m starfast.train

theory: install
	$(PY) -m starfast.theory --out runs/theory

clean:
	rm -rf build $(VENV) starfast/_C*.so *.egg-info
