# Both entry points set themselves up: a virtual environment in .venv with the runner's dependencies.
VENV ?= .venv
PYTHON ?= python3
# The CPU wheel of this version lies on the development machines' disk (installs in seconds);
# GPU machines may override it, e.g. `make TORCH_SPEC='torch==2.13.0' ...` from their own index.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
# checkov (security scan of the chart and the stage Jobs) pins packages that clash with moto's:
# it gets a virtual environment of its own.
CHECKOV_VENV ?= .venv-checkov
CHECKOV_STAMP := $(CHECKOV_VENV)/.installed

.PHONY: demo test setup clean crd images

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet "$(TORCH_SPEC)"
	$(VENV)/bin/python -m pip install --quiet -e '.[runner,operator,test]'
	touch $(STAMP)

$(CHECKOV_STAMP): Makefile
	$(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(CHECKOV_VENV)/bin/python -m pip install --quiet "checkov>=3.2,<4"
	touch $(CHECKOV_STAMP)

setup: $(STAMP) $(CHECKOV_STAMP)

demo: $(STAMP)
	$(VENV)/bin/disp demo

test: $(STAMP) $(CHECKOV_STAMP)
	$(VENV)/bin/python -m pytest -q

# The operator and runner images, built with podman from the Dockerfile on a Debian-made Python
# base (no container registry needed; installs podman, runc and debootstrap when missing). The
# container tests in `make test` build them too, from podman's layer cache when unchanged.
images:
	bash containers/build-images.sh

# The CRD is generated from the typed spec; tests fail when either copy is stale.
crd: $(STAMP)
	$(VENV)/bin/python -m disp_operator.crd > crds/purificationjobs.disp.dev.yaml
	cp crds/purificationjobs.disp.dev.yaml charts/disp-operator/files/purificationjobs.disp.dev.yaml

clean:
	rm -rf $(VENV) $(CHECKOV_VENV) runs .pytest_cache
	-podman rmi localhost/disp-operator:dev localhost/disp-runner:dev 2>/dev/null
