# echo-scp container image.
#
#   docker build -t echo-scp:local .
#   docker run --rm -p 11112:11112 -p 8080:8080 echo-scp:local
#
# Hermetic (offline) build from a wheelhouse made beforehand (deploy/README.md,
# "Air-gapped builds"); nothing is fetched during the build:
#   docker build --network=none --build-context wheelhouse=./wheelhouse \
#     --build-arg PIP_NO_INDEX=1 -t echo-scp:local .
#
# The builder turns the project into a wheel and installs it, with its
# dependencies, into a virtual environment at /opt/venv; the final stage is
# the same slim base with only that venv, the default config and a non-root
# user. tests/test_deploy.py lints this file with hadolint and replays the
# install, ENTRYPOINT, CMD and HEALTHCHECK; tests/test_image.py builds and runs
# the image itself with podman.
#
# No "# syntax=" directive on purpose: BuildKit would pull the
# docker/dockerfile frontend image for it, which an air-gapped build cannot;
# the built-in frontend has everything used here.

# Pinned to a patch release: bump it on purpose (and add an @sha256 digest for
# byte-for-byte reproducible builds). Both stages must use the same base so
# the venv's interpreter path (/usr/local/bin/python3.11) exists in the final one.
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

# Empty by default. --build-context wheelhouse=DIR replaces this stage with a
# directory of wheels, which pip then prefers (and, with PIP_NO_INDEX=1, uses
# exclusively).
FROM scratch AS wheelhouse

FROM ${PYTHON_IMAGE} AS builder

# 1 for a hermetic build: no package index, only /wheelhouse. pip reads its
# PIP_* options from the environment, which build arguments are part of.
ARG PIP_NO_INDEX=0
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_FIND_LINKS=/wheelhouse \
    PYTHONDONTWRITEBYTECODE=1

COPY --from=wheelhouse / /wheelhouse/
WORKDIR /src
# .dockerignore lets only the packaging inputs through (pyproject.toml,
# README.md, LICENSE, service/, config/, deploy/runtime-venv.sh), so this copy
# is small and cache-friendly.
COPY . .

# deploy/runtime-venv.sh, the one recipe for this venv (`make bench` builds its
# own with it): pip wheel fetches the build backend that pyproject.toml names;
# the install then resolves the runtime dependencies within pyproject's ranges.
# Then the venv loses what only installing or testing needs: pip and setuptools
# (nothing installs packages at run time) and the test suites pynetdicom and
# pydicom ship (about 11 MB). Its bytecode is compiled without docstrings,
# asserts kept (python -m echo_scp.bytecode): about 1.6 MiB less memory at rest.
RUN sh deploy/runtime-venv.sh python /opt/venv /src


FROM ${PYTHON_IMAGE}

# Keep in step with echo_scp.__version__ (a test checks it).
ARG VERSION=0.1.0
# The repository URL; pass --build-arg SOURCE_URL=... from CI.
ARG SOURCE_URL=""

LABEL org.opencontainers.image.title="echo-scp" \
      org.opencontainers.image.description="DICOM Verification (C-ECHO) SCP daemon with Prometheus metrics, JSON logs and health endpoints" \
      org.opencontainers.image.source="${SOURCE_URL}" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.version="${VERSION}"

# A fixed numeric UID/GID so Kubernetes' runAsNonRoot can verify it without
# reading /etc/passwd, and so bind-mounted secrets can be chowned to it.
RUN groupadd --system --gid 10001 echo-scp \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin echo-scp

COPY --from=builder /opt/venv /opt/venv
# Owned by root and not writable by the daemon's user: config is read-only.
COPY config/echo-scp.toml /etc/echo-scp/echo-scp.toml

ENV PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH

# DICOM, DICOM over TLS (only when a TLS listener is configured), HTTP
# (/livez, /readyz, /metrics).
EXPOSE 11112 2762 8080

USER 10001

# Liveness only: Docker marks the container unhealthy, it does not restart it,
# so readiness (/readyz) belongs to the orchestrator. Standard library only,
# and it follows ECHO_SCP_HTTP__PORT when the HTTP port is moved.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; port = os.environ.get('ECHO_SCP_HTTP__PORT', '8080'); sys.exit(0 if urllib.request.urlopen(f'http://127.0.0.1:{port}/livez', timeout=4).status == 200 else 1)"]

# The daemon is PID 1 (exec form, no shell): SIGTERM reaches it directly, it
# drains for shutdown_grace_period (5 s), aborts what is left and exits 0,
# inside docker's and podman's default 10 s stop timeout.
ENTRYPOINT ["echo-scp"]
CMD ["serve", "--config", "/etc/echo-scp/echo-scp.toml"]
