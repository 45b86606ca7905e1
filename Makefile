# Every target creates and fills the virtualenv first if it is missing.
VENV   ?= .venv
PYTHON := $(VENV)/bin/python
STAMP  := $(VENV)/.lingosteer-installed
DATA   ?= ../shared/data
PYTEST_ARGS ?=

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup test demo bench clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml tools/setup-venv.sh
	bash tools/setup-venv.sh $(VENV)
	touch $(STAMP)

test: $(STAMP)
	$(PYTHON) -m ruff check .
	$(PYTHON) -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(PYTHON) -m lingosteer.entrypoints.demo --data $(DATA)

bench: $(STAMP)
	bash bench/run_all.sh $(PYTHON) $(DATA)

clean-venv:
	rm -rf $(VENV)
