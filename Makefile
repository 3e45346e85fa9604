# Two commands for users: `make demo` and `make test`. Both set up what is missing first.
SHELL := /bin/bash
ENV := source scripts/env.sh &&
PYTEST_ARGS ?=

.PHONY: env test demo test-fast mutate clean-env

env:
	@scripts/setup_env.sh

test: env
	@$(ENV) python -m pytest -q $(PYTEST_ARGS) test

# Core tier only (no ROS nodes, no slow end-to-end runs).
test-fast: env
	@$(ENV) python -m pytest -q -m "not ros and not slow" $(PYTEST_ARGS) test

# Mutation testing of the critical modules (setup.cfg [mutmut]); slow (about an hour on 2 cores),
# not part of `make test`. Writes mutation_report.txt: counts per module and the surviving mutants.
mutate: env
	@$(ENV) python -m pip install -q --disable-pip-version-check -r requirements-dev.txt && python scripts/mutation_report.py --run

demo: env
	@$(ENV) python -m sas_app.cli demo --out demo_output

clean-env:
	rm -rf "$${SAS_VENV:-$${XDG_CACHE_HOME:-$$HOME/.cache}/sas-ros/venv-py311}"
