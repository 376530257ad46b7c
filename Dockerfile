# syntax=docker/dockerfile:1
# The disagg operator image. Stage 1 builds the wheel and installs it with its dependencies into a
# virtual environment; the final stage holds only that environment on the same slim Python base:
# no compiler, no pip, no sources. tests/packaging/test_dockerfile.py checks this file (hadolint, structure)
# and that the wheel it installs builds and runs from a clean virtual environment. The base image is
# pinned by its (multi-platform) digest, the dependencies by requirements.lock with hashes
# (pip-compile --generate-hashes from pyproject.toml; tests/packaging/test_dockerfile.py keeps them in step).
ARG PYTHON_IMAGE=python:3.11.15-slim-bookworm@sha256:d29f48a31a8b408ed19272ca1e7b10ebae13b240a27e862d3d4217c528e2e0c3

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md requirements.lock ./
COPY operator ./operator
# the wheel, then a venv without pip holding the locked dependencies (every file checked against its
# hash) and the wheel (compiled to .pyc, since the root filesystem is read-only at run time)
RUN pip wheel --no-deps --wheel-dir /dist . \
 && python -m venv --without-pip /opt/disagg \
 && pip --python /opt/disagg/bin/python install --compile --require-hashes --no-deps -r requirements.lock \
 && pip --python /opt/disagg/bin/python install --compile --no-deps /dist/disagg-*.whl

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="disagg-operator" \
      org.opencontainers.image.description="Kubernetes operator for disaggregated (prefill/decode) LLM inference" \
      org.opencontainers.image.licenses="Apache-2.0"
# nothing to install packages with at run time; an unprivileged user with a fixed uid (the chart's
# runAsUser) so kopf and getpass find a name for it
RUN python -m pip uninstall --yes pip setuptools wheel \
 && groupadd --system --gid 65532 disagg \
 && useradd --system --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin disagg
COPY --from=build /opt/disagg /opt/disagg
ENV PATH=/opt/disagg/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 65532:65532
# 8080: /healthz (kopf liveness), 9100: /metrics
EXPOSE 8080 9100
ENTRYPOINT ["disagg", "run"]
CMD ["--all-namespaces"]
