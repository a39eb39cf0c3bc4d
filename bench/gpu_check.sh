#!/usr/bin/env bash
# Check a GPU machine end to end within one short lease and write one JSON report, rewritten after every
# check: the doctor, the real trainer on synthetic miniImageNet in three precisions (and its resume), the
# evaluation script, blocking synchronisations, the published step's speed, two-process DDP, the CUDA tests,
# then the rest as --budget allows. Without a GPU (or with --cpu) the same checks run at tiny sizes on the
# CPU. See bench/gpu_check.py and docs/BENCHMARKS.md.
#
#   bash bench/gpu_check.sh                          # report: $OUT/gpu_check.json, else output/gpu_check/<time>/
#   bash bench/gpu_check.sh --budget 300 --out report.json
#   bash bench/gpu_check.sh --only doctor train_step
set -euo pipefail

source "$(dirname "$0")/../scripts/python_env.sh"
exec "$PYTHON" "$REPO_ROOT/bench/gpu_check.py" "$@"
