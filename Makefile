# `make demo` and `make test` create .venv from requirements.txt and install this checkout into it
# (`pip install -e .`, so scripts and tests import `ldm` from here) on first use.
PY := .venv/bin/python
VENV_STAMP := .venv/.installed

.PHONY: demo test venv clean-venv

venv: $(VENV_STAMP)

$(VENV_STAMP): requirements.txt pyproject.toml
	python3 -m venv .venv
	.venv/bin/pip install --quiet --upgrade pip
	.venv/bin/pip install --quiet -r requirements.txt
	.venv/bin/pip install --quiet --no-deps -e .
	touch $(VENV_STAMP)

demo: $(VENV_STAMP)
	$(PY) scripts/demo.py

test: $(VENV_STAMP)
	$(PY) -m pytest -q tests

clean-venv:
	rm -rf .venv
