#!/usr/bin/env bash
# One engine over every GPU of one or more nodes: each torchrun rank is a worker, rank 0
# also runs the scheduler and the HTTP/gRPC frontend (engine/torchrun.py, docs/architecture.md).
#
# One node, all its GPUs (one worker each):
#   launch/torchrun.sh --model /models/Llama-3.1-8B-Instruct
# Two nodes: run the same line on each; HEAD is the first node's address, reachable by both.
#   NNODES=2 RDZV=HEAD:29400 launch/torchrun.sh --model /models/Llama-3.1-8B-Instruct --host 0.0.0.0
#
# Environment: NPROC (workers on this node; default: its GPUs, else 1), NNODES (default 1),
# RDZV (the c10d rendezvous host:port; without it, one standalone node), RDZV_ID (default
# engine), PYTHON (default .venv/bin/python). Engine flags follow; --workers is the world size.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
nproc=${NPROC:-$("$py" -c 'import torch; print(max(1, torch.cuda.device_count()))')}
if [[ -z ${RDZV:-} ]]; then
    if [[ ${NNODES:-1} != 1 ]]; then
        echo "launch/torchrun.sh: NNODES=${NNODES} needs RDZV=host:port (the first node's)" >&2
        exit 2
    fi
    exec "$py" -m torch.distributed.run --standalone --nproc-per-node "$nproc" \
        -m engine.torchrun "$@"
fi
exec "$py" -m torch.distributed.run --nnodes "${NNODES:-1}" --nproc-per-node "$nproc" \
    --rdzv-backend c10d --rdzv-endpoint "$RDZV" --rdzv-id "${RDZV_ID:-engine}" \
    -m engine.torchrun "$@"
