# ocifit is one standard-library file: a small official Python base, the file, a non-root user. Nothing to install.
# `make build` passes BASE_IMAGE (pin it to a digest from your own mirror: see README, Install) and VERSION.
ARG BASE_IMAGE=python:3.12-slim-bookworm
FROM ${BASE_IMAGE}
ARG BASE_IMAGE
ARG VERSION=unknown
LABEL org.opencontainers.image.title="ocifit" \
      org.opencontainers.image.source="https://github.com/compspec/ocifit" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
COPY ocifit.py /app/ocifit.py
USER 65532:65532
EXPOSE 8443
ENTRYPOINT ["python3", "/app/ocifit.py", "serve"]
