# Two entry points for a fresh machine: `make demo` and `make test` (see README.md).
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || "$$(scripts/find_python.sh)" -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m train --config configs/tiny.yaml

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --durations=15 tests

clean:
	rm -rf $(VENV) runs
