# inferbridge: slim image, non-root, config mounted at /etc/inferbridge/config.yaml
# Pinned by version: a rebuild gets the same Python (PGO + LTO build, as the official images are).
FROM python:3.11.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-cache-dir --prefix=/install '.[all]'

FROM python:3.11.11-slim-bookworm
COPY --from=build /install /usr/local
RUN useradd --system --uid 10001 --no-create-home inferbridge \
    && mkdir -p /etc/inferbridge
USER inferbridge
ENV INFERBRIDGE_HOST=0.0.0.0 \
    INFERBRIDGE_PORT=5000 \
    PYTHONUNBUFFERED=1
EXPOSE 5000
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('INFERBRIDGE_PORT', '5000'), timeout=2)"
# Mount your config at /etc/inferbridge/config.yaml: it is read when it exists.
CMD ["inferbridge", "serve"]
