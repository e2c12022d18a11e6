# mmscale: `make demo` runs the main job on the built-in corpus; `make test` runs the whole suite.
PY := .venv/bin/python
DATA ?=
MINUTES ?=
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast clean-venv

setup:
	@bash tools/setup_env.sh

demo: setup
	@$(PY) -m mmscale.demo $(if $(DATA),--data $(DATA),) $(if $(MINUTES),--minutes $(MINUTES),)

test: setup
	@$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: setup
	@$(PY) -m pytest -q -m "not slow and not slurm" $(PYTEST_ARGS)

clean-venv:
	rm -rf .venv
