# syntax=docker/dockerfile:1
# sweeper: deletes expired sessions from Cloud Datastore. Build from the repository root:
#   docker build -t REGION-docker.pkg.dev/PROJECT_ID/REPOSITORY/sweeper:0.1.0 .
# Pin the base by digest too once it is pulled (python:3.11.14-slim-bookworm@sha256:...).
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# --- builder: wheels of sweeper and of every dependency it needs at run time ------------------
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /build
COPY pyproject.toml setup.cfg README.md ./
COPY sweeper ./sweeper
# Every dependency comes as a prebuilt manylinux wheel (grpcio included): no compiler needed.
RUN pip wheel --wheel-dir /wheels .

# --- runtime: the interpreter, sweeper and its dependencies, nothing else ---------------------
FROM ${PYTHON_IMAGE}
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
# The wheels are bind-mounted from the builder, so they never become a layer of this image.
# Only they are installed (--no-index: nothing is fetched here); pip compiles the bytecode now,
# as the root filesystem is read-only at run time. Then the packaging tools go: the runtime
# needs none of them.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels /wheels/sweeper-*.whl \
    && pip uninstall --yes setuptools wheel \
    && python -m pip uninstall --yes pip \
    && sweeper --version
# Set after the install so that pip still compiles: at run time nothing writes .pyc files.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# A numeric non-root user, so Kubernetes can check runAsNonRoot without an /etc/passwd entry.
USER 10001:10001
ENTRYPOINT ["sweeper"]
CMD ["sweep"]
