# `make demo` and `make test` create .venv from requirements.txt and install this checkout into it
# (`pip install -e .`, so scripts and tests import `ldm` from here) on first use. `make test` runs ruff
# (pyproject.toml's [tool.ruff]) before pytest.
PY := .venv/bin/python
VENV_STAMP := .venv/.installed

.PHONY: demo lint test test-fast venv clean-venv

venv: $(VENV_STAMP)

$(VENV_STAMP): requirements.txt pyproject.toml
	python3 -m venv .venv
	.venv/bin/pip install --quiet --upgrade pip
	.venv/bin/pip install --quiet -r requirements.txt
	.venv/bin/pip install --quiet --no-deps -e .
	touch $(VENV_STAMP)

demo: $(VENV_STAMP)
	$(PY) scripts/demo.py

lint: $(VENV_STAMP)
	$(PY) -m ruff check .

# the linter first (seconds), then the suite
test: lint
	$(PY) -m pytest -q tests

# the edit-test loop: every test not marked slow (pyproject.toml's markers)
test-fast: lint
	$(PY) -m pytest -q -m "not slow" tests

clean-venv:
	rm -rf .venv
