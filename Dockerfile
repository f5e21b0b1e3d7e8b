# ocifit is one standard-library file: a small official Python base, the file, a non-root user. Nothing to install.
FROM python:3.12-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
COPY ocifit.py /app/ocifit.py
USER 65532:65532
EXPOSE 8443
ENTRYPOINT ["python3", "/app/ocifit.py", "serve"]
