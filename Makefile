# Two commands for users: `make demo` and `make test`. Both set up what is missing first.
SHELL := /bin/bash
ENV := source scripts/env.sh &&
PYTEST_ARGS ?=

.PHONY: env test demo test-fast clean-env

env:
	@scripts/setup_env.sh

test: env
	@$(ENV) python -m pytest -q $(PYTEST_ARGS) test

# Core tier only (no ROS nodes, no slow end-to-end runs).
test-fast: env
	@$(ENV) python -m pytest -q -m "not ros and not slow" $(PYTEST_ARGS) test

demo: env
	@$(ENV) python -m sas_app.cli demo --out demo_output

clean-env:
	rm -rf "$${SAS_VENV:-$${XDG_CACHE_HOME:-$$HOME/.cache}/sas-ros/venv-py311}"
