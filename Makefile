# Two entry points for a fresh machine: `make demo` and `make test` (see README.md).
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LOCK := constraints.txt
EXTRAS := train,test

.PHONY: demo test lint venv test-latest lock clean

venv: $(STAMP)

# Installs the pinned versions of constraints.txt (the library's own ranges live in pyproject.toml).
$(STAMP): pyproject.toml $(LOCK)
	@test -x $(PY) || "$$(scripts/find_python.sh)" -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c $(LOCK) -e ".[$(EXTRAS)]"
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m train --config configs/tiny.yaml --overwrite

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist worksteal --durations=15 tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The newest versions pyproject.toml allows, in a separate environment (.venv-latest).
test-latest:
	@test -x .venv-latest/bin/python || "$$(scripts/find_python.sh)" -m venv .venv-latest
	.venv-latest/bin/python -m pip install --quiet --upgrade pip
	.venv-latest/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager -e ".[$(EXTRAS)]"
	.venv-latest/bin/python -m pytest -q -n 2 tests

# Rewrites constraints.txt from the current .venv (after the suite passed with it).
lock: $(STAMP)
	@{ sed -n '1,3p' $(LOCK); $(PY) -m pip freeze --exclude-editable | grep -v '^#'; } > $(LOCK).new
	@mv $(LOCK).new $(LOCK)

clean:
	rm -rf $(VENV) .venv-latest runs
