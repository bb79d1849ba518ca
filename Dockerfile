# syntax=docker/dockerfile:1
#
# statestore service image: small (python:3.11-slim, no compiler, no build
# tools in the final stage), non-root (fixed uid/gid 10001), health-checked.
#
#   docker build -t statestore:local .
#   docker run -p 8080:8080 -e STATESTORE_ETCD_ENDPOINTS=etcd:2379 \
#       -e STATESTORE_BLOB_ROOT=s3://bucket/ckpt statestore:local
#
# The image has no etcd binary: STATESTORE_ETCD_ENDPOINTS must name a cluster
# (the embedded default of `make run` is for development only).

ARG PYTHON_IMAGE=python:3.11-slim

# --- build: the project's wheel and the wheels of all its dependencies -------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY statestore ./statestore
COPY api ./api
RUN python -m pip wheel --wheel-dir /wheels .

# --- final: a venv installed from those wheels only ---------------------------
FROM ${PYTHON_IMAGE}
ARG UID=10001
ARG GID=10001
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/statestore \
    PATH=/opt/statestore/bin:$PATH
RUN groupadd --system --gid "${GID}" statestore \
 && useradd --system --uid "${UID}" --gid "${GID}" --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin statestore
# The wheels are bind-mounted, not copied: they never become a layer here.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python -m venv "${VIRTUAL_ENV}" \
 && "${VIRTUAL_ENV}/bin/pip" install --no-index --find-links=/wheels statestore \
 && "${VIRTUAL_ENV}/bin/pip" uninstall -y pip

# Service defaults; every STATESTORE_* setting can be overridden at run time.
# STATESTORE_HOME is only used by the embedded default; /tmp keeps it writable
# under a read-only root filesystem.
ENV STATESTORE_HOST=0.0.0.0 \
    STATESTORE_PORT=8080 \
    STATESTORE_WORKERS=1 \
    STATESTORE_MAINTENANCE=true \
    STATESTORE_LOG_JSON=true \
    STATESTORE_LOG_LEVEL=info \
    STATESTORE_HOME=/tmp/statestore

WORKDIR /tmp
USER 10001:10001
EXPOSE 8080

# No curl in slim: ask /healthz with the interpreter that is already there.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; port = os.environ.get('STATESTORE_PORT', '8080'); r = urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=4); sys.exit(0 if r.status == 200 else 1)"]

CMD ["statestore", "serve", "--host", "0.0.0.0"]
