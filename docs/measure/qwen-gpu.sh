#!/usr/bin/env bash
# The A/B measurement, part 2: Qwen2.5-Coder-0.5B-Instruct on one CUDA GPU with the transformers backend.
# Fits a `head` and a `lora` adapter on GSM8K train rollouts, then compares base and lora (always, gated) on
# GSM8K test rows 0-299 and SVAMP rows 400-699 (gated lora needs this backend; the head arms are cheap on
# vLLM, see qwen-gsm8k-cpu.sh and qwen-svamp-cpu.sh; ARMS=... names others).
#   bash docs/measure/qwen-gpu.sh [rollouts|fit|ab|ab-gsm8k|all]      (each stage resumes or skips what is done)
# DATA (default ../shared/data) holds gsm8k/; WORK (default out/qwen-gpu) gets everything.
set -euo pipefail
STAGE=${1:-all}
DATA=${DATA:-../shared/data}
WORK=${WORK:-out/qwen-gpu}
RM=${RM:-reasonmaxxer}
DEVICE=${DEVICE:-cuda}
M=${MODEL:-qwen2.5-coder-0.5b-instruct}
N_TRAIN=${N_TRAIN:-160} N_TEST=${N_TEST:-300} SAMPLES=${SAMPLES:-8} MAXTOK=${MAXTOK:-512} CONC=${CONC:-128}
H=qwen05-gsm8k$N_TRAIN-head
L=qwen05-gsm8k$N_TRAIN-lora
ARMS=${ARMS:-base,$L:always,$L:gated}
mkdir -p "$WORK"

if [[ $STAGE == rollouts || $STAGE == all ]]; then
  # GSM8K train rows 0-159, 8 samples each (the paper: ~150 problems x 20; 8 keeps it to minutes)
  $RM rollouts --device $DEVICE --model $M --problems "$DATA/gsm8k/train.jsonl" --preset gsm8k --offset 0 --limit $N_TRAIN \
    --samples $SAMPLES --max-new-tokens $MAXTOK --temperature 0.6 --top-p 0.95 --concurrency $CONC --out "$WORK/rollouts.jsonl"
fi

if [[ $STAGE == fit || $STAGE == all ]]; then
  # the 50 mixed problems closest to pass rate 0.5; tau calibrated to 3% of completion tokens
  # head: the paper's schedule (lr 1e-4, one epoch). The first run used the bundled adapters' lr 3e-4 x 3 epochs: on 399 sequences
  # (150 steps) it over-trained (log p at decision points -0.50 positive / -0.81 negative, KL 0.13).
  [[ -f $WORK/$H/adapter.json ]] || $RM fit --device $DEVICE --model $M --rollouts "$WORK/rollouts.jsonl" --kind head \
    --name $H --rank 32 --lr 0.0001 --epochs 1 --accumulation 8 --warmup 50 --target-fire-rate 0.03 --out "$WORK/$H"
  # the paper's adapter: LoRA r32 / alpha 64 on q,k,v,o, AdamW 1e-4, one epoch, fp32
  [[ -f $WORK/$L/adapter.json ]] || $RM fit --device $DEVICE --model $M --rollouts "$WORK/rollouts.jsonl" --kind lora \
    --name $L --rank 32 --lr 0.0001 --epochs 1 --accumulation 8 --warmup 50 --target-fire-rate 0.03 --out "$WORK/$L"
fi

if [[ $STAGE == ab* || $STAGE == all ]]; then
  $RM serve --device $DEVICE --model $M --adapter "$WORK/$H" --adapter "$WORK/$L" --port 8300 --max-batch-size $CONC \
    --log-level warning > "$WORK/serve.log" 2>&1 &
  SERVER=$!
  trap 'kill $SERVER' EXIT
  until python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:8300/health')" 2> /dev/null; do
    kill -0 $SERVER; sleep 2
  done
  $RM ab --url http://127.0.0.1:8300 --problems "$DATA/gsm8k/test.jsonl" --preset gsm8k --limit $N_TEST --samples 1 \
    --arms "$ARMS" \
    --max-tokens $MAXTOK --concurrency $CONC --out "$WORK/ab-gsm8k-test"
  # SVAMP rows 400-699: another distribution, never used for fitting
  [[ $STAGE == ab-gsm8k ]] || $RM ab --url http://127.0.0.1:8300 --problems "$DATA/svamp/test.jsonl" --preset svamp \
    --offset 400 --limit $N_TEST --samples 1 --arms "$ARMS" \
    --max-tokens $MAXTOK --concurrency $CONC --out "$WORK/ab-svamp-test"
fi
