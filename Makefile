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

.PHONY: demo test setup clean crd images prometheus-tools

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

test: $(STAMP) $(CHECKOV_STAMP) prometheus-tools
	$(VENV)/bin/python -m pytest -q

# promtool (alert-rule unit tests, exposition lint) and a Prometheus server (the dashboard's queries
# run against it): Debian's prometheus package, installed when missing.
prometheus-tools:
	@command -v promtool >/dev/null && command -v prometheus >/dev/null || { \
	  [ "$$(id -u)" = 0 ] || { echo "promtool/prometheus missing and not root: apt-get install prometheus" >&2; exit 1; }; \
	  echo "installing Debian's prometheus package (promtool and the server)"; \
	  apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    prometheus >/dev/null; }

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
