# The wlcad runtime image: the package and its serving dependencies (no training extras, no GPU).
FROM python:3.11-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /opt/wlcad
COPY pyproject.toml README.md ./
COPY services ./services
COPY training ./training
COPY model_repository ./model_repository
RUN pip install --no-cache-dir . && useradd --system --uid 10001 wlcad
USER wlcad
ENV WLCAD_MODEL_REPOSITORY=/opt/wlcad/model_repository
ENTRYPOINT ["wlcad"]
CMD ["info"]
