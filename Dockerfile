# PapCAD server image: the same commands as the README (`papcad serve`), with PostgreSQL via DATABASE_URL.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PAPCAD_DATA_DIR=/var/lib/papcad PAPCAD_RESOURCE_DIR=/srv/papcad
WORKDIR /srv/papcad

# The locked runtime dependencies (about 2 GB), each checked against its hash in the lock file.
COPY requirements.txt ./
RUN pip install --require-hashes -r requirements.txt

# PapCAD itself into site-packages, without dependencies (all installed above, setuptools included).
COPY pyproject.toml /tmp/papcad/
COPY app /tmp/papcad/app
RUN pip install --no-deps --no-build-isolation /tmp/papcad && rm -rf /tmp/papcad \
    && useradd --system --home /var/lib/papcad --create-home papcad

# What the installed package does not ship, found through PAPCAD_RESOURCE_DIR: the migrations and the bundled
# model (alembic.ini serves only the `alembic` command line).
COPY alembic.ini ./
COPY migrations ./migrations
COPY model_store ./model_store

USER papcad
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz')"
CMD ["papcad", "serve", "--host", "0.0.0.0", "--port", "8000"]
