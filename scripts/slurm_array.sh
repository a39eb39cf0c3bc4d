#!/usr/bin/env bash
# One SLURM job-array task per command line of a file: many runs (seeds, data sets, ablations) as one submission.
#
#   bash scripts/slurm_array.sh --count runs.txt                     # how many command lines the file has
#   sbatch --array=1-$(bash scripts/slurm_array.sh --count runs.txt) --gres=gpu:1 --cpus-per-task=8 \
#       scripts/slurm_array.sh runs.txt                               # task N runs the N-th command line
#   SLURM_ARRAY_TASK_ID=3 bash scripts/slurm_array.sh runs.txt        # what task 3 runs, here, without SLURM
#
# runs.txt holds one complete command per line (blank lines and lines starting with '#' are skipped), e.g. the
# training lines of an experiment script written out with their values. Each runs with bash from the folder
# sbatch was called in ($SLURM_SUBMIT_DIR), so relative paths mean the same as on the submitting shell.
set -euo pipefail

count_only=
if [ "${1:-}" = "--count" ]; then count_only=1; shift; fi
[ $# -eq 1 ] || { echo "usage: bash $0 [--count] COMMANDS_FILE" >&2; exit 2; }
commands=$1
[ -f "$commands" ] || { echo "$commands: no such file of command lines" >&2; exit 2; }
lines=$(grep -v -e '^[[:space:]]*#' -e '^[[:space:]]*$' "$commands" || true)
total=$(printf '%s' "$lines" | grep -c '' || true)
if [ -n "$count_only" ]; then echo "$total"; exit 0; fi

task=${SLURM_ARRAY_TASK_ID:?not a SLURM array task: submit with sbatch --array=1-$total, or set SLURM_ARRAY_TASK_ID}
if ! [ "$task" -ge 1 ] 2>/dev/null || [ "$task" -gt "$total" ]; then
    echo "task $task: $commands has $total command lines (submit with --array=1-$total)" >&2
    exit 2
fi
line=$(printf '%s\n' "$lines" | sed -n "${task}p")
cd "${SLURM_SUBMIT_DIR:-.}"
echo "task $task of $total: $line"
exec bash -c "$line"
