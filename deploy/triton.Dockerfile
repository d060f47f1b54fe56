# Triton for pe-rank: the stock NGC image plus this project's Python models' dependencies, installed
# with the image's own Python (the Python backend's stub runs that interpreter), and the TensorRT
# wheel of the image's own TensorRT, so `pe-rank export --target tensorrt` run in this image builds
# engines its Triton loads.
#
#   docker build -f deploy/triton.Dockerfile -t REGISTRY/pe-rank-triton:24.12 .
#
# Floor: 24.12. It is the first tag on Ubuntu 24.04 with Python 3.12; up to 24.11 the image's Python
# is 3.10, below this project's requires-python (>= 3.11). Our Python models also need python_backend
# 24.06+ (execute() returning None, answers through response senders, non-decoupled) and 24.09+
# (MetricFamily.HISTOGRAM); 24.12 has both. Later tags: set TENSORRT_VERSION to that tag's TensorRT
# (NGC release notes); the build below fails if the two disagree.
# Not built or run by this project's CI: no container engine, no GPU there (see README).
ARG TRITON_TAG=24.12
FROM nvcr.io/nvidia/tritonserver:${TRITON_TAG}-py3

# TensorRT in nvcr.io/nvidia/tritonserver:24.12-py3 (NGC release notes: 10.7.0.23)
ARG TENSORRT_VERSION=10.7.0
# PyPI's torch 2.13.0 (the core pin) depends on CUDA 13 libraries, which need NVIDIA driver 580+ on
# the GPU nodes. With an older driver, point this at PyTorch's index for the image's CUDA (12.6 in
# 24.12), e.g. https://download.pytorch.org/whl/cu126 if it carries 2.13.0 (not checked here).
ARG TORCH_INDEX_URL=""
# Ubuntu 24.04's Python is "externally managed" (PEP 668): this image is the environment
ENV PIP_BREAK_SYSTEM_PACKAGES=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1

WORKDIR /opt/pe-rank
COPY pyproject.toml README.md ./
COPY server ./server
COPY export ./export
COPY model_repository ./model_repository

# 1. the image's Python is one this project supports; 2. install (editable: `pe-rank export` copies
# model_repository/*/1/model.py from this checkout) with the TensorRT wheel of the image's TensorRT;
# 3. that wheel's TensorRT is the one Triton's TensorRT backend loads (libnvinfer in this image);
# 4. what Triton imports from our models imports with the image's Python.
RUN python3 -c 'import sys; v = sys.version_info; assert v >= (3, 11), \
        f"this image has Python {v.major}.{v.minor}; pe-rank needs 3.11+: use tritonserver 24.12 or later"' \
 && if [ -n "${TORCH_INDEX_URL}" ]; then python3 -m pip install torch==2.13.0 --index-url "${TORCH_INDEX_URL}"; fi \
 && python3 -m pip install -e '.[triton,export]' "tensorrt-cu12==${TENSORRT_VERSION}.*" \
 && python3 -c 'from importlib.metadata import version; \
from pe_rank_export.tensorrt_build import check_runtime_match, runtime_version; \
runtime = runtime_version(); print("TensorRT wheel", version("tensorrt-cu12"), "image runtime", runtime); \
assert runtime, "no TensorRT runtime found in the image"; check_runtime_match(version("tensorrt-cu12"), runtime)' \
 && python3 -c 'import pe_rank.triton_backend.bls, pe_rank.triton_backend.config_check, onnxruntime, torch'

# the NGC entrypoint stays; the Deployment passes `tritonserver ...` as args
CMD ["tritonserver", "--model-repository=/models"]
