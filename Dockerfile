# popcontrol server / worker / rig image (CPU build; for CUDA workers base on a CUDA image and
# install the matching torch wheel instead of the pinned CPU one).
FROM python:3.11-slim
WORKDIR /app
RUN apt-get update && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml README.md ./
COPY server ./server
COPY rig ./rig
COPY models ./models
COPY migrations ./migrations
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
    && pip install --no-cache-dir -e .
ENV POPCONTROL_DATA_DIR=/data
VOLUME ["/data"]
EXPOSE 8000 5601
CMD ["popcontrol", "serve", "--host", "0.0.0.0"]
