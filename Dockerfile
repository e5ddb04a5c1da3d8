# syntax=docker/dockerfile:1
# sweeper: deletes expired sessions from Cloud Datastore. Build from the repository root:
#   docker build -t REGION-docker.pkg.dev/PROJECT_ID/REPOSITORY/sweeper:0.1.0 .
# The base is pinned by the digest of the tag's multi-architecture index: a tag can be pushed
# again, a digest cannot. Refresh both together (`crane digest python:3.11.14-slim-bookworm`,
# or `docker buildx imagetools inspect`), as deploy/README.md says.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d

# --- builder: wheels of sweeper and of every dependency it needs at run time ------------------
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /build
# Every dependency exactly as requirements.lock pins it, each file checked against the lock's
# hashes (a file that differs fails the build), and only as prebuilt wheels (grpcio included):
# no compiler, and nothing resolved here. `make lock` writes the lock from setup.cfg.
COPY requirements.lock ./
RUN pip download --require-hashes --no-deps --only-binary :all: --dest /wheels \
    -r requirements.lock
# sweeper's own wheel, built by the base image's setuptools (pinned with it by the digest):
# no build dependency is fetched.
COPY pyproject.toml setup.cfg README.md LICENSE ./
COPY sweeper ./sweeper
RUN pip wheel --no-deps --no-build-isolation --wheel-dir /wheels .

# --- runtime: the interpreter, sweeper and its dependencies, nothing else ---------------------
FROM ${PYTHON_IMAGE}
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
# The wheels are bind-mounted from the builder, so they never become a layer of this image.
# Only they are installed (--no-index: nothing is fetched here; --no-deps: the lock already
# holds every dependency, and pip check proves it); pip compiles the bytecode now, as the root
# filesystem is read-only at run time. Then the packaging tools go: the runtime needs none.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-index --no-deps /wheels/*.whl \
    && pip check \
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
