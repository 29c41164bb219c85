# One image for every segq service: GPU and CPU workers, the coordinator, migrate, flower and the CLI.
#
# GPU: the default torch wheel carries its own CUDA runtime; the host needs only the NVIDIA driver and
# the NVIDIA Container Toolkit (docker-compose.yml reserves the GPUs). A CPU-only image is much smaller:
#   docker build --build-arg TORCH_PIP_ARGS="--index-url <PyTorch's CPU wheel index>" -t segq:cpu .
#
# BASE_IMAGE must give `python` 3.11+ and `pip` on PATH. Production pulls python:3.11-slim; the compose
# tests (scripts/compose-test.sh) pass a Debian image made with debootstrap, since no registry is reachable
# there, and PIP_ARGS="--no-index --find-links <a wheelhouse made on the host>".
ARG BASE_IMAGE=python:3.11-slim

# The package's source, gathered so that the image gets it in one layer: under the vfs storage driver
# (the compose tests) every layer is a full copy of the image.
FROM scratch AS source
COPY pyproject.toml README.md /src/
COPY segq /src/segq
COPY worker /src/worker
COPY producer /src/producer
COPY migrations /src/migrations

FROM ${BASE_IMAGE}

# Settings first and the one USER step last: the classic builder copies the whole image for every
# step, which under vfs costs about a minute a step once torch is in.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    SEGQ_STORAGE=/data/storage \
    SEGQ_DATA_DIR=/data/segq
# docker-compose.yml gives each service its command; alone, the image is the CLI.
CMD ["segq", "--help"]
ARG TORCH_SPEC="torch>=2.3,<3"
ARG TORCH_PIP_ARGS=""
ARG PIP_ARGS=""

RUN groupadd --gid 1000 segq && useradd --uid 1000 --gid 1000 --create-home segq \
    && mkdir -p /data/storage /app && chown -R segq:segq /data

WORKDIR /app

# torch first, in its own layer: it is the large part and changes least.
RUN pip install ${PIP_ARGS} ${TORCH_PIP_ARGS} "${TORCH_SPEC}"

COPY --from=source /src ./
RUN pip install ${PIP_ARGS} ".[worker,dicom,postgres,flower]" && segq --help >/dev/null

USER segq
