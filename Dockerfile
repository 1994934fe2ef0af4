# syntax=docker/dockerfile:1
# Two images from one Dockerfile:
#   docker build --target operator -t disp-operator:0.1.0 .   # the controller: no runner, no torch
#   docker build --target runner   -t disp-runner:0.1.0 .     # the stage pods (`disp`): torch with CUDA
# The operator installs its own distribution (operator/pyproject.toml: the contract, the store and
# the controller); the runner installs the project as the README does (pip install of this source
# tree with the `runner` extra). Each goes into a virtual environment built in a throw-away stage,
# so no compiler or pip cache ships.

ARG PYTHON_IMAGE=python:3.11.10-slim-bookworm

FROM ${PYTHON_IMAGE} AS build-base
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /src

FROM build-base AS build-operator
# pip reads both from the environment (empty: ignored), also in its isolated build environments.
# A build behind a TLS-intercepting proxy passes the proxy's CA bundle as PIP_CERT, and one that
# should take torch from a local wheel folder passes that folder as PIP_FIND_LINKS
# (containers/build-images.sh does both, with the files bind-mounted read-only).
ARG PIP_CERT=""
COPY api ./api
COPY store ./store
COPY operator ./operator
RUN python -m venv /opt/disp \
    && /opt/disp/bin/pip install --no-cache-dir ./operator

FROM build-base AS build-runner
# The PyPI torch wheel for Linux carries its CUDA runtime; the node provides the driver. It is
# installed before the source is copied, so a change to the source does not reinstall it.
ARG TORCH_SPEC=torch==2.13.0
ARG PIP_CERT=""
ARG PIP_FIND_LINKS=""
RUN python -m venv /opt/disp \
    && /opt/disp/bin/pip install --no-cache-dir "${TORCH_SPEC}"
COPY pyproject.toml README.md ./
COPY api ./api
COPY store ./store
COPY runner ./runner
COPY operator ./operator
RUN /opt/disp/bin/pip install --no-cache-dir ".[runner]"

# What both final images share: the non-root user the pods run as (UID 10001, as the operator's
# Job builder and the chart's securityContext expect) and the venv on PATH.
FROM ${PYTHON_IMAGE} AS final-base
LABEL org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --gid 10001 disp && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin disp
ENV PATH=/opt/disp/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1

FROM final-base AS operator
LABEL org.opencontainers.image.title="disp-operator" \
      org.opencontainers.image.description="Kubernetes operator for DiSP backdoor purification of MDLMs"
COPY --from=build-operator /opt/disp /opt/disp
USER 10001:10001
EXPOSE 8080 9090
# Kubernetes probes /healthz itself; this is for plain `docker run`.
HEALTHCHECK --interval=30s --timeout=5s CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4)"]
ENTRYPOINT ["disp-operator"]
CMD ["--all-namespaces"]

FROM final-base AS runner
LABEL org.opencontainers.image.title="disp-runner" \
      org.opencontainers.image.description="DiSP stage runner (saliency, masking, relabel, finetune, evaluate)"
COPY --from=build-runner /opt/disp /opt/disp
# The root filesystem is read-only in the pods: caches and temporary files go to the scratch volume
# mounted at /scratch (the runner makes the folders below it at start). The mount point belongs to
# the runner's user, so that a plain `docker run` without a volume can write there too.
RUN mkdir /scratch && chown 10001:10001 /scratch
ENV HF_HUB_OFFLINE=1 DISP_SCRATCH=/scratch HOME=/scratch/home HF_HOME=/scratch/hf TMPDIR=/scratch/tmp
USER 10001:10001
# A batch container (no server to probe); the operator reads its exit code.
HEALTHCHECK NONE
ENTRYPOINT ["disp"]
CMD ["--help"]
