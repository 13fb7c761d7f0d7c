#!/usr/bin/env bash
# The evaluation harnesses users point at our server, each in a venv of its own (they pin datasets and
# huggingface_hub differently, and neither belongs in the project's venv): lm-evaluation-harness with
# its API extra (transformers for a local tokenizer folder) and evalscope. tests/test_harnesses.py runs
# them; they only talk HTTP to the server, so neither needs torch.
# Usage: bash deploy/install-harnesses.sh [ROOT]   (venvs: ROOT/.venv-lm-eval, ROOT/.venv-evalscope)
set -euo pipefail
root=${1:-$(cd "$(dirname "$0")/.." && pwd)}
python3 -m venv "$root/.venv-lm-eval"
"$root/.venv-lm-eval/bin/pip" install -q 'lm-eval[api]==0.4.13' 'transformers>=5.16.1,<6'
python3 -m venv "$root/.venv-evalscope"
"$root/.venv-evalscope/bin/pip" install -q 'evalscope==1.14.1'
echo "lm-eval:   $root/.venv-lm-eval/bin/lm_eval"
echo "evalscope: $root/.venv-evalscope/bin/evalscope"
