# make test  — set up .venv if needed, build the extension, run pytest and the C++ tests
# make demo  — the main job on the bundled default data
# make bench — the pytest-benchmark suite
# make theory — the paper's Appendix A experiments (Lemma 2, Tables 3 and 4)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export MAX_JOBS ?= 2

.PHONY: install test test-python test-cpp bench demo theory clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch is installed only when absent: on these machines `torch==2.13.0` is a local CPU wheel, and
# letting pip resolve a plain `torch` would pull a multi-GB CUDA build.
$(VENV)/.deps: $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install numpy scipy safetensors tqdm pytest pytest-benchmark ninja matplotlib scikit-learn mnist1d torchmetrics
	touch $@

$(VENV)/.built: $(VENV)/.deps setup.py pyproject.toml $(wildcard csrc/*/*.cpp csrc/*/*.hpp csrc/ops/*/*.cpp csrc/ops/*/*.cu)
	$(PY) -m pip install --no-build-isolation --no-deps -e .
	touch $@

install: $(VENV)/.built

# Both suites always run; the target fails at the end if either failed.
test: install
	@status=0; \
	$(MAKE) --no-print-directory test-python || status=1; \
	$(MAKE) --no-print-directory test-cpp || status=1; \
	if [ $$status -ne 0 ]; then echo "make test: a suite failed (see above)"; fi; \
	exit $$status

test-python: install
	$(PY) -m pytest -q tests

test-cpp:
	cmake -S . -B build/cmake -DCMAKE_BUILD_TYPE=Release >/dev/null
	cmake --build build/cmake -j 2
	ctest --test-dir build/cmake --output-on-failure

bench: install
	$(PY) -m pip install lapx >/dev/null 2>&1 || echo "lapx not installable: its column is skipped"
	$(PY) -m pytest benchmarks -q --benchmark-columns=median,iqr,rounds --benchmark-sort=name

# mlp (width 24) on digits: 10 sources, 3 held-out, 3 stars trained 150 epochs, the barrier table.
demo: install
	$(PY) -m starfast.train --arch-kw width=24 --star-seeds 3 --star-epochs 150

theory: install
	$(PY) -m starfast.theory --out runs/theory

clean:
	rm -rf build $(VENV) starfast/_C*.so *.egg-info
