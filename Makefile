# Both entry points set themselves up: a virtual environment in .venv with the runner's dependencies.
VENV ?= .venv
PYTHON ?= python3
# PyPI's Linux wheel of torch is the CUDA build (about 3 GB to download, 5.5 GB in the venv; it
# runs on the CPU too). Override to take another build, e.g. a CPU wheel from a local folder:
# `make TORCH_SPEC='torch==2.13.0+cpu' PIP_FIND_LINKS=/path/to/wheels test`.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
# checkov (security scan of the chart and the stage Jobs) pins many packages of its own: it gets a
# virtual environment of its own.
CHECKOV_VENV ?= .venv-checkov
CHECKOV_STAMP := $(CHECKOV_VENV)/.installed

.PHONY: demo test test-fast setup clean crd images prometheus-tools k8s docs

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

test: $(STAMP) $(CHECKOV_STAMP) prometheus-tools k8s
	$(VENV)/bin/python -m pytest -q

# The inner loop: every test but those on the real control plane (e2e), those with the images
# (containers) and those that train a model or run several stages (slow). Tests that read or write
# S3 still start the MinIO server, and the chart tests run helm: both are built by the first
# `make test` (or `make k8s`). `make test` and CI run everything.
test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m "not e2e and not containers and not slow"

# The documentation site (docs/, mkdocs.yml) in site/; its reference pages and diagram are generated
# from the code first (tools/docs_reference.py needs helm for the chart's alerts: `make k8s`).
docs: $(STAMP)
	$(VENV)/bin/python tools/docs_reference.py
	$(VENV)/bin/mkdocs build --strict

# The real Kubernetes control plane of the end-to-end tests (kube-apiserver, kube-controller-manager,
# kube-scheduler, etcd) and kubectl, built from their Go modules as pinned in tools/controlplane/,
# and the cluster tools (helm, kustomize, the MinIO server, Kueue) pinned in tools/clustertools/,
# into versioned folders under ~/.cache/disp-operator (cold: about 5 min for the control plane and
# 8 min for the tools on 2 cores; nothing is rebuilt while the pins are unchanged). Needs Go 1.26
# and the Go module proxy.
k8s:
	bash tools/controlplane/build.sh
	bash tools/clustertools/build.sh

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
