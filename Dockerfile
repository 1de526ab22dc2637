# PapCAD server image: the same commands as the README (`papcad serve`), with PostgreSQL via DATABASE_URL.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    PAPCAD_DATA_DIR=/var/lib/papcad
WORKDIR /srv/papcad

COPY requirements.txt ./
RUN pip install -r requirements.txt

COPY pyproject.toml alembic.ini ./
COPY app ./app
COPY migrations ./migrations
COPY model_store ./model_store
RUN pip install --no-deps . \
    && useradd --system --home /var/lib/papcad --create-home papcad
# The package is installed into site-packages; keep the source tree as the project root it reads
# model_store/, migrations/ and alembic.ini from.
ENV PYTHONPATH=/srv/papcad

USER papcad
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz')"
CMD ["papcad", "serve", "--host", "0.0.0.0", "--port", "8000"]
