#!/usr/bin/env bash
# Issue 13: the paper's oracle made runnable. Base Qwen2.5-Coder-0.5B-Instruct, teacher Qwen2.5-Coder-1.5B-Instruct
# (same tokenizer), GSM8K test rows OFFSET..OFFSET+LIMIT-1 (default 0-299), chat template, T 0.6, top-p 0.95,
# 512 tokens, the same seeds in every arm. Every stage resumes where it stopped (ab folders are pools of paired
# samples); run them in this order:
#   bash docs/measure/qwen-teacher-cpu.sh arms      # base; teacher gated at the base's tau (1.44) and at two more
#                                                   # thresholds; teacher at random positions at RATE; always (top-5)
#   bash docs/measure/qwen-teacher-cpu.sh alone     # the teacher alone (served as the base), the same seeds
#   bash docs/measure/qwen-teacher-cpu.sh distil    # GSM8K *train* rollouts of the base, then fit --teacher (head)
#   bash docs/measure/qwen-teacher-cpu.sh distilled # the distilled head gated and always, on the same problems
# DEVICE=cuda runs every stage on a GPU (minutes instead of hours).
# ARMS overrides the teacher arms of `arms` (e.g. ARMS=gated@1.44,random@0.03 for the oracle and its control).
# Cost on the 2-core CPU: a teacher arm costs about 4x the base per answer (the lazy prefill reads nearly the whole
# text with a model 3x the size): see bench/teacher.py and docs/results.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
source docs/measure/common.sh
WORK=${WORK:-out/teacher}
M=qwen2.5-coder-0.5b-instruct
T=qwen2.5-coder-1.5b-instruct
OFFSET=${OFFSET:-0}
LIMIT=${LIMIT:-300}
PORT=${PORT:-8301}
ARMS=${ARMS:-gated@1.44,gated@1.0,gated@2.2,random@0.03,always}
TEST=../shared/data/gsm8k/test.jsonl
mkdir -p "$WORK"

serve() {  # $1 model, then extra serve flags; waits until healthy, stops on exit
  serve_with .venv/bin/reasonmaxxer "$PORT" "$WORK/server-$1.log" --model "$1" --device "${DEVICE:-cpu}" \
    --max-batch-size 48 --max-tokens-limit 1024 "${@:2}"
}
ab() {  # $1 arms, $2 out folder
  .venv/bin/reasonmaxxer ab --url "http://127.0.0.1:$PORT" --problems $TEST --preset gsm8k --offset $OFFSET \
    --limit $LIMIT --samples 1 --arms "$1" --max-tokens 512 --temperature 0.6 --top-p 0.95 --concurrency 48 \
    --timeout 7200 --out "$2"
}
case ${1:?stage: arms, alone, distil or distilled} in
  arms)
    serve $M --teacher $T
    ab "base,$(echo "$ARMS" | sed "s/\([^,]*\)/$T:\1/g")" "$WORK/ab-gsm8k-$OFFSET-$LIMIT" ;;
  alone)
    serve $T --no-bundled-adapter
    ab base "$WORK/ab-gsm8k-$OFFSET-$LIMIT-teacher-alone" ;;
  distil)
    .venv/bin/reasonmaxxer rollouts --model $M --device "${DEVICE:-cpu}" --problems ../shared/data/gsm8k/train.jsonl --preset gsm8k --limit 50 \
      --samples 4 --max-tokens 512 --temperature 0.6 --top-p 0.95 --concurrency 48 \
      --out "$WORK/qwen05-gsm8k-train0-49-chat4.jsonl"
    .venv/bin/reasonmaxxer fit --model $M --device "${DEVICE:-cpu}" --rollouts "$WORK/qwen05-gsm8k-train0-49-chat4.jsonl" --teacher $T \
      --kind head --threshold 1.44 --score-cache "$WORK/scores" --out "$WORK/qwen05-gsm8k-distilled-head" ;;
  distilled)
    serve $M --adapter "$WORK/qwen05-gsm8k-distilled-head"
    ab "base,qwen05-gsm8k-distilled-head:gated,qwen05-gsm8k-distilled-head:always" "$WORK/ab-gsm8k-$OFFSET-$LIMIT" ;;
  *) echo "unknown stage $1: use arms, alone, distil or distilled" >&2; exit 2 ;;
esac
