# regfit in a container:
#
#   docker build -t regfit .                                   # GPU-capable (CUDA torch wheels)
#   docker build --build-arg TORCH_VARIANT=cpu -t regfit:cpu . # CPU-only, a much smaller image
#   docker run --gpus all -v "$PWD/data:/data" -v "$PWD/logs:/logs" regfit \
#       regfit fit --config configs/mnist_l2.yaml
#
# Build arguments:
#   TORCH_VARIANT  cuda (default: torch as PyPI ships it, with its CUDA libraries) or cpu
#                  (torch from the PyTorch CPU wheel index).
#   TORCH_INDEX    a pip index URL for torch that overrides the variant's, e.g. a CUDA-specific
#                  PyTorch index or a local mirror.
# Volumes: /data holds the datasets (REGFIT_DATA_DIR), /logs the Lightning and W&B logs and
# checkpoints (./lightning_logs and ./wandb point there).
FROM python:3.11-slim

ARG TORCH_VARIANT=cuda
ARG TORCH_INDEX=""

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    REGFIT_DATA_DIR=/data \
    WANDB_DIR=/logs

WORKDIR /app

# The same two installs as the README: torch pinned first, then regfit under the same
# constraint, so pip never resolves a different torch.
COPY constraints.txt ./
RUN case "$TORCH_VARIANT" in \
        cpu) export PIP_INDEX_URL="${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}" ;; \
        cuda) if [ -n "$TORCH_INDEX" ]; then export PIP_INDEX_URL="$TORCH_INDEX"; fi ;; \
        *) echo "TORCH_VARIANT must be cuda or cpu, got '$TORCH_VARIANT'" >&2; exit 1 ;; \
    esac \
    && pip install -c constraints.txt torch==2.13.0

COPY pyproject.toml README.md ./
COPY regfit ./regfit
RUN pip install -c constraints.txt .

COPY configs ./configs

# An unprivileged user owns only the two volumes; the code stays read-only to it.
# A numeric USER lets Kubernetes' runAsNonRoot verify it.
RUN groupadd --gid 1000 regfit \
    && useradd --create-home --uid 1000 --gid 1000 regfit \
    && mkdir -p /data /logs \
    && chown 1000:1000 /data /logs \
    && ln -s /logs /app/lightning_logs
USER 1000:1000
VOLUME ["/data", "/logs"]

CMD ["regfit", "--help"]
