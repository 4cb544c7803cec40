# ternrec application image: worker, recommender, UI and replay (docker-compose.yml picks the command).
# The serving install (`pip install .`: the core dependencies of pyproject.toml) from the ordinary
# package index; no apt-get and no other index, so the build also runs offline from a wheelhouse
# (make compose-check passes PIP_NO_INDEX=1 PIP_FIND_LINKS=<its loopback wheelhouse>).
# Base images are build arguments, the official Python images by default: PYTHON_BUILD_IMAGE must
# carry a C compiler (the native kernel is compiled there), PYTHON_IMAGE the venv module.
ARG PYTHON_BUILD_IMAGE=python:3.11
ARG PYTHON_IMAGE=python:3.11-slim

# The package as a wheel with its native kernel: the one step that needs a compiler.
FROM ${PYTHON_BUILD_IMAGE} AS build
ARG PIP_NO_INDEX=0
ARG PIP_FIND_LINKS=
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/build
COPY . /src
RUN /opt/build/bin/pip wheel --no-deps --wheel-dir /wheels /src

FROM ${PYTHON_IMAGE}
ARG PIP_NO_INDEX=0
ARG PIP_FIND_LINKS=
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
RUN useradd --create-home --uid 10001 ternrec \
 && mkdir -p /home/ternrec/.cache/ternrec/replay \
 && chown -R ternrec:ternrec /home/ternrec/.cache \
 && python3 -m venv /opt/venv
# Dependencies first, in their own layer: a code change does not reinstall them.
COPY pyproject.toml /tmp/pyproject.toml
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('/tmp/pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt \
 && rm /tmp/pyproject.toml /tmp/requirements.txt
COPY --from=build /wheels /tmp/wheels
RUN pip install --no-deps /tmp/wheels/*.whl && rm -rf /tmp/wheels
# The services run from /app (the bundled model and data are found beside the code), so the
# built kernel is copied there too.
COPY --chown=ternrec:ternrec . /app
WORKDIR /app
RUN cp /opt/venv/lib/python3*/site-packages/encoder/kernel/_tq2k*.so encoder/kernel/ \
 && python -c "import encoder.kernel as k; k._lib()"
USER ternrec
# Models and data are bundled: never reach the Hugging Face hub at run time.
ENV PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TERNREC_HTTP_HOST=0.0.0.0
EXPOSE 8000 8501
CMD ["python", "-m", "recommender.service"]
