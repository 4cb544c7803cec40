# ternrec application image: worker, recommender, UI and replay (docker-compose.yml picks the command).
# The serving install (`pip install .`, the core dependencies of pyproject.toml) from the ordinary
# package index; no apt-get and no other index, so the build also runs offline from a wheelhouse
# (make compose-check: PIP_NO_INDEX=1 PIP_FIND_LINKS=<local wheelhouse>).
# Base images are build arguments: the official Python images by default; PYTHON_BUILD_IMAGE
# must carry a C compiler (the native kernel is compiled) and put python3 where PYTHON_IMAGE does.
ARG PYTHON_BUILD_IMAGE=python:3.11
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_BUILD_IMAGE} AS build
ARG PIP_NO_INDEX=0
ARG PIP_FIND_LINKS=
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
RUN python3 -m venv /opt/venv
WORKDIR /app
# Dependencies first, in their own layer: a code change does not reinstall them.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt
COPY . .
# The package with its native kernel compiled. The services run from /app (the bundled model and
# data are found beside the code), so the built kernel is copied there too.
RUN pip install --no-deps . \
 && cd / && python -c "import shutil, encoder.kernel._tq2k as m; shutil.copy(m.__file__, '/app/encoder/kernel/')" \
 && cd /app && python -c "import encoder.kernel as k; k._lib()"

FROM ${PYTHON_IMAGE}
RUN useradd --create-home --uid 10001 ternrec \
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
