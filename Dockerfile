# ternrec application image: encoder worker, recommender, UI and replay (docker-compose.yml picks the command).
# CPU-only: torch comes from PyTorch's CPU wheel index, so no CUDA libraries are pulled in.

FROM python:3.11-slim AS build
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
# The CPU build of the pinned torch first: `pip install .` then finds its pin satisfied.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.15.0
WORKDIR /app
COPY . .
# The package and its pinned dependencies, with the native kernel compiled. The services run from /app
# (the bundled model and data are found beside the code), so the built kernel is copied there too.
RUN pip install . \
 && cd / && python -c "import shutil, encoder.kernel._tq2k as m; shutil.copy(m.__file__, '/app/encoder/kernel/')" \
 && cd /app && python -c "import encoder.kernel as k; k._lib()"

FROM python:3.11-slim
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 10001 ternrec \
 && mkdir -p /home/ternrec/.cache/ternrec/replay \
 && chown -R ternrec:ternrec /home/ternrec/.cache
COPY --from=build /opt/venv /opt/venv
COPY --from=build --chown=ternrec:ternrec /app /app
WORKDIR /app
USER ternrec
# Models and data are bundled: never reach the Hugging Face hub at run time.
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
    TERNREC_HTTP_HOST=0.0.0.0
EXPOSE 8000 8501
CMD ["python", "-m", "recommender.service"]
