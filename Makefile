# The two commands a newcomer types first: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint typecheck check clean bench lab lab-down

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q --config-settings editable_mode=compat -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/twistd -n mailsys --config etc/mailsys.toml

# A teaching lab: three mail domains on 127.0.2.x, see README.md.
lab: $(STAMP)
	$(BIN)/mailsys lab up

lab-down: $(STAMP)
	$(BIN)/mailsys lab down

test: $(STAMP)
	$(BIN)/ruff check mailsys tests bench twisted
	$(BIN)/mypy
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check mailsys tests bench twisted

typecheck: $(STAMP)
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python bench/smtp_intake.py

clean:
	rm -rf $(VENV) var build *.egg-info
