# syntax=docker/dockerfile:1
#
# kap container image.
#
#   docker build -t ghcr.io/kap-project/kap:0.1.0 --build-arg REVISION="$(git rev-parse HEAD)" .
#
# Two stages on the same pinned Python base: "build" installs kap's locked
# dependencies into the virtual environment /opt/kap, then kap's own wheel;
# the runtime stage copies only that environment. The dependencies come from
# requirements/runtime.txt (nox -s lock), hash-checked, wheels only and without
# resolution, so the image holds exactly the versions the tests ran; kap's
# wheel goes in with --no-deps and `pip check` proves the lock complete. No
# compiler is installed in either stage, no pip cache is kept, and the bytecode
# is compiled at build time so the image runs with a read-only root filesystem.
# REVISION (the git commit; the build context has no .git) is written into the
# wheel, so `kap --version` and the start-up log name it.
# tests/test_image.py runs the same wheel and install commands outside Docker;
# keep the two in step.

# python:3.11.14-slim-bookworm, pinned by tag and by the digest of its
# multi-architecture index. Update both together:
#   docker buildx imagetools inspect python:3.11.14-slim-bookworm
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY requirements/runtime.txt requirements/runtime.txt
RUN python -m venv --without-pip /opt/kap \
 && pip --python /opt/kap/bin/python install --no-compile \
        --require-hashes --no-deps --only-binary=:all: -r requirements/runtime.txt
COPY pyproject.toml setup.py README.md ./
COPY kap/ kap/
# After the dependencies, so a new commit reuses their layer.
ARG REVISION=unknown
ENV KAP_REVISION=${REVISION}
RUN pip wheel --no-deps --wheel-dir /dist .
RUN pip --python /opt/kap/bin/python install --no-compile --no-deps /dist/kap-*.whl \
 && pip --python /opt/kap/bin/python check \
 && python -m compileall -q -j 0 --invalidation-mode unchecked-hash /opt/kap/lib

FROM ${PYTHON_IMAGE}
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="kap" \
      org.opencontainers.image.description="Node-local TCP load balancer for Kubernetes API servers" \
      org.opencontainers.image.source="https://github.com/kap-project/kap" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/kap /opt/kap
ENV PATH=/opt/kap/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# nobody:nogroup. The static pod overrides this to root to read its key.
USER 65534:65534
WORKDIR /
EXPOSE 6445 6480
ENTRYPOINT ["kap"]
