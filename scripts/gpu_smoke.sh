#!/usr/bin/env bash
# GPU smoke test of scope's pruning (python -m scope.smoke): tiny LLaVA / LLaVA-NeXT models built from configs
# (no download), float16 and bfloat16, sdpa and flash-attention-2 (when flash-attn is installed), batch 1
# and 4, every pruning method; one line per check (PASS|FAIL|SKIP ...), the total time, exit status 1 if any
# check fails. Under two minutes on a CUDA machine.
#
#   scripts/gpu_smoke.sh                    # on cuda
#   scripts/gpu_smoke.sh --device cuda:1    # another GPU; any other flag of python -m scope.smoke works too
#   scripts/gpu_smoke.sh --device cpu --quick   # what the tests run (float32)
#
# The interpreter: $PYTHON if set, else the repository's .venv (make setup), else python on the PATH.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -n "${PYTHON:-}" ]]; then
    py="$PYTHON"
elif [[ -x "$root/.venv/bin/python" ]]; then
    py="$root/.venv/bin/python"
else
    py=python
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1  # the tiny models are built from configs: nothing to fetch
exec "$py" -m scope.smoke "$@"
