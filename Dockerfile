# filefeed plugin image. Its install step is the project's own `scripts/install.sh --runtime` (the project and its
# runtime dependencies, and Debian's gnupg for encryption = pgp; no test tools, no S3/GCS emulator wheels), the same
# script CI runs in its full mode, so a change to the install is exercised by every CI run (tests/deploy/
# test_image.py runs the runtime mode in a fresh virtualenv and probes the server with this file's HEALTHCHECK).
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/filefeed
COPY pyproject.toml README.md ./
COPY config config
COPY filefeed filefeed
COPY pipeline pipeline
COPY sinks sinks
COPY scripts/install.sh scripts/install.sh
RUN scripts/install.sh --runtime

# A non-root user owns the staging volume; the process never needs root.
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/filefeed --create-home filefeed
USER 10001:10001

ENV FILEFEED_STAGING_DIR=/var/lib/filefeed \
    PLUGIN_PORT=8080 \
    FILEFEED_WORKERS=2
VOLUME ["/var/lib/filefeed"]
EXPOSE 8080

HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('PLUGIN_PORT', '8080') + '/v1/status', timeout=2)"]

# uvicorn drains on SIGTERM: it stops accepting, answers the requests in flight, then each worker's shutdown seals
# its open journal. Kubernetes' grace period (deploy/kubernetes/filefeed.yaml) leaves room for that.
STOPSIGNAL SIGTERM
CMD ["filefeed", "serve"]
