# syntax=docker/dockerfile:1
# Cotune: one image for every service (coordinator, llm, slm, alignment); the command picks which, from its config.
#
#   docker build -t cotune:cpu .                                  # CPU torch (the default VARIANT)
#   docker build -t cotune:cuda --build-arg VARIANT=cuda .        # CUDA torch; run with the NVIDIA container toolkit
#   docker run --rm -v "$PWD/llm.yaml:/etc/cotune/config.yaml:ro" -v cotune-llm:/var/lib/cotune/work \
#       -v cotune-certs:/etc/cotune/certs:ro -v "$PWD/inputs:/inputs:ro" cotune:cpu serve llm --config /etc/cotune/config.yaml
#
# The config file, the certificates, the workdir (a volume: blob store, caches, run state; the coordinator's SQLite) and
# the models/data are mounted; nothing of a deployment is baked in. See docs/deploy.md (sizes, compose, Kubernetes).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# -- build: a virtual environment with torch and Cotune ---------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS build
ARG VARIANT=cpu
ARG TORCH_VERSION=2.13.0
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
# the CUDA build's index; pick the one your torch version and driver support (cu126, cu128, ...)
ARG TORCH_CUDA_INDEX=https://download.pytorch.org/whl/cu128
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/cotune/bin:$PATH
# Compilers live in this stage only, for a dependency without a wheel for the target platform; the final stage has none.
# (Not version-pinned: the base image's Debian release pins them, and nothing of them reaches the final stage.)
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/cotune
# torch first, from the variant's index: Cotune requires torch>=2.4,<3, which the installed build then satisfies, so
# the CPU image never pulls the CUDA wheels from PyPI (and the CUDA image brings its CUDA runtime as wheels: no CUDA
# base image is needed, only the host's driver).
RUN case "$VARIANT" in \
      cpu)  index="$TORCH_CPU_INDEX" ;; \
      cuda) index="$TORCH_CUDA_INDEX" ;; \
      *)    echo "VARIANT must be cpu or cuda, got '$VARIANT'" >&2; exit 1 ;; \
    esac \
 && pip install --index-url "$index" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY cotune ./cotune
COPY coordinator ./coordinator
COPY llm_server ./llm_server
COPY slm_client ./slm_client
COPY alignment ./alignment
# A regular (not editable) install: the package with its generated gRPC stubs (committed in cotune/v1, so no protoc
# here) and its runtime dependencies; then a smoke test of the stubs and the CLI.
RUN pip install /src \
 && python -c "import cotune.v1.coordinator_pb2, cotune.v1.party_pb2, cotune.v1.alignment_pb2, cotune.healthcheck" \
 && cotune --help > /dev/null

# -- runtime: the environment, a non-root user, no compilers, no sources ----------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
ARG VARIANT=cpu
LABEL org.opencontainers.image.title="cotune" \
      org.opencontainers.image.description="Federated co-tuning of an LLM and small LMs: coordinator, llm, slm and alignment services" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.cotune.variant="${VARIANT}"
# uid/gid 10001: the Kubernetes manifests (deploy/k8s) run as this user and give it the volumes through fsGroup. The
# directories exist (owned by it) so that an empty named volume mounted there starts with the same owner.
RUN groupadd --system --gid 10001 cotune \
 && useradd --system --uid 10001 --gid cotune --no-create-home --home-dir /var/lib/cotune --shell /usr/sbin/nologin cotune \
 && mkdir -p /etc/cotune/certs /var/lib/cotune/work /inputs \
 && chown cotune:cotune /etc/cotune/certs /var/lib/cotune /var/lib/cotune/work
COPY --from=build /opt/cotune /opt/cotune
# HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE: models are mounted files; a service never downloads weights at run time.
# HOME=/tmp: caches of torch and friends go to a writable scratch directory, also under a read-only root filesystem.
ENV PATH=/opt/cotune/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HOME=/tmp
USER 10001:10001
WORKDIR /var/lib/cotune/work
# main ports as in deploy/ (coordinator, llm, slm, alignment) and the plaintext health port (health_address)
EXPOSE 50041 50051 50061 50071 8081
ENTRYPOINT ["cotune"]
CMD ["--help"]
