# newsletter: the pages and the worker on port 8000; config.toml and the SQLite file live on the /data volume.
#   docker build -t newsletter .
#   docker run --rm -v newsletter-data:/data newsletter newsletter init      (once: answers the questions)
#   docker run -d --name newsletter -p 127.0.0.1:8000:8000 -v newsletter-data:/data newsletter
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    NEWSLETTER_CONFIG=/data/config.toml

WORKDIR /app
COPY pyproject.toml README.md config.example.toml ./
COPY newsletter ./newsletter
COPY templates ./templates
COPY migrations ./migrations
RUN pip install --no-cache-dir '.[postgres]' && rm -rf /app/*

RUN useradd --system --home-dir /data --shell /usr/sbin/nologin newsletter \
    && mkdir -p /data && chown newsletter:newsletter /data
USER newsletter
WORKDIR /data
VOLUME /data
EXPOSE 8000

HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD python -c "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status != 200)"

# docker stop sends SIGTERM: serve finishes what is in flight and exits 0.
CMD ["sh", "-c", "newsletter db upgrade && exec newsletter serve --host 0.0.0.0 --port 8000"]
