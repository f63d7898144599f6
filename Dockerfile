# syntax=docker/dockerfile:1
# The peerd image: `peerd` is the entrypoint, it runs as a non-root user, the converted default model
# is baked in (the /var/cache/peerd volume keeps it and anything fetched later), and Docker checks
# the peer's health on its HTTP port.
#
#   docker build -t peerd:latest .                              (or: make image)
#   docker run -p 31330:31330 -p 9100:9100 peerd:latest run --initial-peers /ip4/.../p2p/...
#   docker run -p 31330:31330 -p 9100:9100 peerd:latest bootstrap --new-swarm
#   docker build --build-arg PEERD_MODEL= -t peerd:no-weights . (no model inside: mount a cache that has it)
#
# Ports, the HTTP side and the identity come from PEERD_* variables (below), so any `run` or
# `bootstrap` command line gets them and the HEALTHCHECK finds /healthz; a flag still wins.
#
# Stages: `build` installs peerd into a virtualenv (torch pinned through constraints.txt, CPU wheel);
# `weights` adds the converter (transformers + gguf, the `convert` extra) and runs `peerd model fetch`;
# the final stage copies only the virtualenv and the converted model, so the converter stays out.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python -m venv /opt/peerd
# The CPU build of torch, at the version constraints.txt pins for dev and CI (an unpinned torch from
# PyPI is a multi-GB CUDA build). Its own dependencies come from the same index.
COPY constraints.txt ./
RUN /opt/peerd/bin/pip install -c constraints.txt --index-url https://download.pytorch.org/whl/cpu torch
COPY pyproject.toml README.md ./
COPY peerd ./peerd
COPY protocols ./protocols
RUN /opt/peerd/bin/pip install -c constraints.txt .

FROM build AS weights
# Model id to bake into the image; empty for an image without weights.
ARG PEERD_MODEL=smollm2-135m
RUN mkdir -p /cache/models \
    && if [ -n "$PEERD_MODEL" ]; then \
        /opt/peerd/bin/pip install -c constraints.txt ".[convert]" \
        && /opt/peerd/bin/peerd model fetch --model "$PEERD_MODEL" --cache-dir /cache --quiet; \
    fi

FROM ${PYTHON_IMAGE}
ARG PEERD_UID=10001
RUN groupadd --system --gid "$PEERD_UID" peerd \
    && useradd --system --uid "$PEERD_UID" --gid peerd --home-dir /home/peerd --create-home \
        --shell /usr/sbin/nologin peerd \
    && mkdir -p /var/cache/peerd /var/lib/peerd \
    && chown peerd:peerd /var/cache/peerd /var/lib/peerd
COPY --from=build /opt/peerd /opt/peerd
COPY --from=weights --chown=peerd:peerd /cache /var/cache/peerd
ENV PATH=/opt/peerd/bin:$PATH \
    PEERD_CACHE_DIR=/var/cache/peerd \
    PEERD_PORT=31330 \
    PEERD_HTTP_HOST=0.0.0.0 \
    PEERD_HTTP_PORT=9100 \
    PEERD_IDENTITY=/var/lib/peerd/identity.key \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER peerd
WORKDIR /var/lib/peerd
# models (weights cache) and state (identity key: keep it and the peer id survives a new container)
VOLUME ["/var/cache/peerd", "/var/lib/peerd"]
# 31330: libp2p (publish it, or announce a relay, for others to reach you); 9100: metrics and health page
EXPOSE 31330/tcp 9100/tcp
# /healthz answers 200 once a peer serves its blocks (503 while joining or draining), or while a
# bootstrap node has its network. Loading and measuring can take minutes on a slow machine, hence
# the long start period. A --http-port flag on the command line must match PEERD_HTTP_PORT.
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PEERD_HTTP_PORT', '9100'), timeout=4)"]
ENTRYPOINT ["peerd"]
CMD ["run"]
