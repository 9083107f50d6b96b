# RunPod Serverless image for lingbot-worker. Build: docker build -t lingbot-worker .
# Optional: --build-arg BAKE_MODEL=robbyant/lingbot-world-fast-diffusers snapshots the weights into the image
# (large image, no volume needed); by default weights come from RunPod's cached models or a network volume.
ARG BASE_IMAGE=pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/opt/hf \
    HF_HUB_DISABLE_TELEMETRY=1 \
    LINGBOT_MODEL=robbyant/lingbot-world-fast-diffusers \
    LINGBOT_NUM_GPUS=1 \
    LINGBOT_OUTPUT_DIR=/tmp/lingbot-outputs \
    NCCL_NVLS_ENABLE=0 \
    TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \
    NVSHMEM_DISABLE_NVLS=1

WORKDIR /app

# Dependencies first (cached layer). The base image's CUDA torch satisfies the package's "torch>=2.5" range, so
# pip keeps it; the check below fails the build if anything replaced it with a CPU wheel.
COPY pyproject.toml README.md* ./
COPY worker/ ./worker/
RUN python -c "import torch; print(torch.__version__)" > /tmp/torch-before \
 && python -m pip install ".[runpod,fa4]" \
 && python -c "import torch; print(torch.__version__)" | cmp - /tmp/torch-before \
 && rm /tmp/torch-before

COPY handler.py ./

ARG BAKE_MODEL=""
RUN if [ -n "$BAKE_MODEL" ]; then \
      python -c "import sys; from huggingface_hub import snapshot_download; print(snapshot_download(sys.argv[1]))" "$BAKE_MODEL"; \
    fi

CMD ["python", "-u", "handler.py"]
