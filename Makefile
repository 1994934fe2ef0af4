# Both entry points set themselves up: a virtual environment in .venv with the runner's dependencies.
VENV ?= .venv
PYTHON ?= python3
# The CPU wheel of this version lies on the development machines' disk (installs in seconds);
# GPU machines may override it, e.g. `make TORCH_SPEC='torch==2.13.0' ...` from their own index.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test setup clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet "$(TORCH_SPEC)"
	$(VENV)/bin/python -m pip install --quiet -e '.[runner,operator,test]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/disp demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
