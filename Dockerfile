# GPU image for serving and exporting with TensorRT:  docker build -t semivit . && \
#   docker run --gpus all -v $PWD/models:/models -v $PWD/images:/images semivit predict /images --model /models/export
# The CUDA runtime comes from the base image; TensorRT and onnxruntime-gpu come from the `gpu` extra
# (pip wheels that carry their own libraries).  torch 2.14.1 on PyPI is a CUDA 13 build.
FROM nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/semivit PATH=/opt/semivit/bin:$PATH
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-dev \
        libgl1 libglib2.0-0 && rm -rf /var/lib/apt/lists/* && python3 -m venv $VIRTUAL_ENV

WORKDIR /src
COPY pyproject.toml README.md ./
COPY semivit ./semivit
# onnxruntime (CPU) and onnxruntime-gpu must not both be installed: keep only the GPU build.
RUN pip install --upgrade pip && pip install '.[gpu]' && pip uninstall -y onnxruntime && \
    pip install --force-reinstall --no-deps "onnxruntime-gpu>=1.20,<2" && ssl --help > /dev/null

WORKDIR /work
ENTRYPOINT ["ssl"]
CMD ["--help"]
