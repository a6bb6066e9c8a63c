# GPU image for serving, exporting (TensorRT) and training.  No Docker engine runs on the project's
# own machines: the image is linted there (tests/test_docker.py runs hadolint), built and run elsewhere:
#   docker build -t semivit .
#   docker run --rm --gpus all -v "$PWD/models:/models" -v "$PWD/images:/images:ro" -v "$PWD/out:/out" \
#       semivit predict /images --model /models/export --out /out/predictions.csv
# The CUDA runtime comes from the base image; TensorRT and onnxruntime-gpu come from the `gpu` extra
# (pip wheels that carry their own libraries).  torch 2.14.1 on PyPI is a CUDA 13 build.
FROM nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/semivit PATH=/opt/semivit/bin:$PATH

# apt: each package pinned to its Ubuntu 24.04 release series (security fixes within it still apply).
RUN apt-get update && apt-get install -y --no-install-recommends \
        python3.12=3.12.* python3.12-venv=3.12.* python3.12-dev=3.12.* \
        libgl1=1.7.* libglib2.0-0t64=2.80.* \
    && rm -rf /var/lib/apt/lists/* \
    && python3.12 -m venv "$VIRTUAL_ENV"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY semivit ./semivit
# pip itself pinned; semivit's own dependencies are pinned or bounded in pyproject.toml.
# onnxruntime (CPU) and onnxruntime-gpu must not both be installed: keep only the GPU build.
RUN pip install pip==26.3 \
    && pip install './[gpu]' \
    && pip uninstall -y onnxruntime \
    && pip install --force-reinstall --no-deps onnxruntime-gpu==1.31.1

# A non-root user; the models live in a volume (a run, an export or a registry), mounted at /models.
RUN groupadd --gid 10001 semivit \
    && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin semivit \
    && mkdir -p /models /work \
    && chown semivit:semivit /models /work
USER 10001:10001
WORKDIR /work
VOLUME ["/models"]

# The image is healthy only if the command line starts (imports, entry point) as that user.
RUN ssl --help > /dev/null && python -c "import semivit.serve.predict, semivit.trainer.pipeline"

ENTRYPOINT ["ssl"]
CMD ["--help"]
