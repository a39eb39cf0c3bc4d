# Sourced by the shell entry points (train_bml.sh, train_baseline.sh, eval_bml.sh, bench/gpu_check.sh):
# sets PYTHON ($PYTHON if set, else `python`, else `python3` on PATH) and puts the repository on PYTHONPATH.
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-$(command -v python || command -v python3 || true)}
if [[ -z $PYTHON ]]; then
    echo "error: neither python nor python3 is on PATH (or set PYTHON=/path/to/python)" >&2
    exit 1
fi
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
