# One image for the four services, the topics job and the simulator: `billing <part>` picks the part.
# Two stages: the first builds a virtualenv from the runtime lock alone (no test or benchmark packages:
# those are in requirements-dev.lock), the second copies it onto a clean base and runs as a numeric
# non-root user, so that Kubernetes' runAsNonRoot can verify it and a read-only root filesystem works.
FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/billing
WORKDIR /src
COPY requirements.lock ./
# --no-deps: the lock is the whole tree, so nothing outside it can come in.
RUN /opt/billing/bin/pip install --no-deps -r requirements.lock
COPY pyproject.toml README.md ./
COPY shared shared
COPY services services
COPY simulator simulator
COPY cli cli
RUN /opt/billing/bin/pip install --no-deps . && /opt/billing/bin/python -m compileall -q /opt/billing

FROM python:3.11-slim-bookworm
# Bytecode was compiled in the build stage; the root filesystem is read-only at run time.
ENV PATH=/opt/billing/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
COPY --from=build /opt/billing /opt/billing
RUN groupadd --system --gid 10001 billing && useradd --system --uid 10001 --gid 10001 --no-create-home billing
WORKDIR /app
USER 10001:10001
ENTRYPOINT ["billing"]
