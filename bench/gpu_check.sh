#!/usr/bin/env bash
# Check a GPU machine end to end in one command (about 5-8 minutes on one GPU) and write one JSON report:
# the CUDA tests, an fp32 step against the CPU, fp16/bf16 steps, channels_last, torch.compile, DDP over
# NCCL (2+ GPUs), and the training-step, evaluation (and data-loading) benchmarks at full size.
# Without a GPU (or with --cpu) the same checks run on the CPU at tiny size. See bench/gpu_check.py.
#
#   bash bench/gpu_check.sh                      # report: gpu_check.json
#   bash bench/gpu_check.sh --out report.json --only fp32_matches_cpu compile
set -euo pipefail

source "$(dirname "$0")/../scripts/python_env.sh"
exec "$PYTHON" "$REPO_ROOT/bench/gpu_check.py" "$@"
