# One image for every process: router, log writer, workers, beat, flower, migrations.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app

COPY pyproject.toml README.md ./
COPY project ./project
COPY handlers ./handlers
COPY tasks ./tasks
COPY celeryconfig.py flowerconfig.py alembic.ini ./
COPY migrations ./migrations
# [otel]: the OpenTelemetry SDK and OTLP exporter, used only when OTEL_* asks for traces.
RUN pip install ".[otel]" && useradd --system --home /app eventbus

USER eventbus
CMD ["eventbus", "router"]
