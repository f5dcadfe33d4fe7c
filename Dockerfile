# syntax=docker/dockerfile:1
# One image for every role: the API (`minordpo serve`), the dispatcher (`minordpo dispatcher`), the
# schema migration (`minordpo db upgrade`) and the Ray head/worker nodes (`ray start ...`).
#
#   docker build -t minordpo .                                   # CPU torch (the default)
#   docker build -t minordpo \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .   # a CUDA build of torch
#
# The Ray nodes must run this same image: the dispatcher submits `/opt/venv/bin/python -m
# workers.entrypoint JOB_ID` to the cluster, so that interpreter and the project must exist there.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------- builder: a virtual environment with torch, the dependencies and the project ----------
FROM ${PYTHON_IMAGE} AS builder

# Where torch comes from: the CPU wheel index by default; a CUDA index (e.g. .../whl/cu128) or PyPI
# (https://pypi.org/simple, whose Linux x86_64 torch is a CUDA build) for GPUs.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first, from its own index, so the project's `torch>=2.4` is already satisfied and never swapped.
RUN python -m venv /opt/venv \
    && pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

WORKDIR /app

# The dependencies in their own layer (rebuilt only when pyproject.toml changes): read them from
# pyproject.toml instead of `pip install .`, which would need the whole source tree here.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; print('\n'.join(deps))" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt

# The project itself, installed editable from /app on purpose: core/store/migrate.py finds Alembic's
# scripts at <source root>/migrations, which a plain `pip install .` would leave out of site-packages.
# The runtime stage copies /app and /opt/venv to the same paths, so the editable mapping stays valid.
COPY . .
RUN pip install --no-deps -e . \
    && python -c "from core.store.migrate import MIGRATIONS_DIR as m; assert (m / 'env.py').is_file(), m" \
    && minordpo --help > /dev/null

# ---------- runtime: the slim base, the venv and the source; runs as an unprivileged user ----------
FROM ${PYTHON_IMAGE} AS runtime

ARG APP_UID=1000
ARG APP_GID=1000

# /data is the shared volume (artifacts, models, datasets): created here and owned by the app user, so a
# fresh named volume mounted on it starts with the right owner.
RUN groupadd --gid "${APP_GID}" app \
    && useradd --uid "${APP_UID}" --gid app --create-home --home-dir /home/app --shell /usr/sbin/nologin app \
    && mkdir -p /data/artifacts \
    && chown -R app:app /data

# Code and venv stay owned by root (read-only for the service); only /data, /tmp and $HOME are writable.
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /app /app

# Defaults for a container; docker-compose.yml and `docker run -e` override them.
# MINORDPO_HOST=0.0.0.0: loopback is unreachable from outside a container; the server refuses to bind
# off loopback without API tokens, so an unconfigured container fails closed.
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/app \
    HF_HOME=/data/cache/huggingface \
    MINORDPO_HOST=0.0.0.0 \
    MINORDPO_PORT=8000 \
    MINORDPO_DATABASE_URL=sqlite:////data/minordpo.db \
    MINORDPO_ARTIFACTS_DIR=/data/artifacts \
    MINORDPO_RAY_STATE_FILE=/data/ray-head.json \
    RAY_AUTH_MODE=token \
    RAY_USAGE_STATS_ENABLED=0

WORKDIR /app
# numeric, so Kubernetes runAsNonRoot and hosts without an "app" user can verify it
USER ${APP_UID}:${APP_GID}
EXPOSE 8000

# Roles differ in what "healthy" means (API /readyz, Ray dashboard, Ray agent), so each compose service
# defines its own healthcheck with python + urllib (the image has no curl).
CMD ["minordpo", "serve"]
