#!/usr/bin/env bash
# The gate as a router at matched budgets (pre-registered): does a teacher consulted where the base is uncertain
# beat the same teacher consulted at random positions, for the same number of consultations?
# Base Qwen2.5-Coder-0.5B-Instruct, teacher Qwen2.5-Coder-1.5B-Instruct (top-5: the teacher re-ranks the base's
# top 5 where it fires), GSM8K *test* rows 300-499, 1 sample, chat template, T 0.6, top-p 0.95, 512 tokens, the
# same seed per problem in every arm. Stages, in this order (each resumes where it stopped):
#   bash docs/measure/qwen-router.sh calibrate  # tau firing on 10% of the base's tokens, measured on GSM8K *train*
#                                               # rows 200-259 (base rollouts, chat, same sampling): WORK/tau.json
#   bash docs/measure/qwen-router.sh gated      # arms base and teacher gated at that tau
#   bash docs/measure/qwen-router.sh random     # the teacher at random positions, at the gated arm's measured rate
#   bash docs/measure/qwen-router.sh alone      # the teacher alone, the same seeds (the gap the arms recover)
#   bash docs/measure/qwen-router.sh report     # gated against random (primary), each against base
# Nothing is chosen on the evaluation rows: tau comes from train rows, the random rate from the gated arm's own
# measured rate (the budget to match), both fixed before the random arm runs.
# WORK (default runs/qwen-router, committed) holds tau.json, the calibration rollouts and the A/B folders;
# COMMIT_EVERY=SECONDS commits its progress while a stage runs. DEVICE=cuda runs on a GPU.
set -euo pipefail
cd "$(dirname "$0")/../.."
source docs/measure/common.sh
WORK=${WORK:-runs/qwen-router}
LOGS=${LOGS:-out/qwen-router}
M=qwen2.5-coder-0.5b-instruct
T=qwen2.5-coder-1.5b-instruct
PORT=${PORT:-8302}
RATE_TARGET=0.10
# One dtype for every stage and arm, whatever CPU a stage lands on: the run began on an AVX2-only CPU (float32, its
# preferred dtype); an AVX-512 CPU would pick bfloat16 and the arms would differ in numerics, not only in routing.
DTYPE=${DTYPE:-float32}
AB=$WORK/ab-gsm8k-test-300-499
CALIB=$WORK/qwen05-gsm8k-train200-259-chat1.jsonl.gz
mkdir -p "$WORK" "$LOGS"

serve() {  # $1 model, then serve flags (the transformers backend: vLLM cannot run a teacher)
  serve_with .venv/bin/reasonmaxxer "$PORT" "$LOGS/serve-$1.log" --model "$1" --dtype "$DTYPE" \
    --device "${DEVICE:-cpu}" --max-batch-size 32 --max-tokens-limit 1024 --log-level warning "${@:2}"
}
ab() {  # $1 arms, $2 out folder
  .venv/bin/reasonmaxxer ab --url "http://127.0.0.1:$PORT" --problems ../shared/data/gsm8k/test.jsonl \
    --preset gsm8k --offset 300 --limit 200 --samples 1 --arms "$1" --prompt-style chat --max-tokens 512 \
    --temperature 0.6 --top-p 0.95 --concurrency 32 --timeout 7200 --out "$2"
}
tau() { python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["tau"])' "$WORK/tau.json"; }

stage=${1:?stage: calibrate, gated, random, alone or report}
[[ $stage == report ]] || track_stage "$WORK" "$stage"
case $stage in
  calibrate)
    .venv/bin/reasonmaxxer rollouts --model $M --dtype "$DTYPE" --device "${DEVICE:-cpu}" \
      --problems ../shared/data/gsm8k/train.jsonl --preset gsm8k --offset 200 --limit 60 --samples 1 \
      --prompt-style chat --max-tokens 512 --temperature 0.6 --top-p 0.95 --concurrency 32 --out "$CALIB"
    .venv/bin/python - "$CALIB" "$RATE_TARGET" "$WORK/tau.json" "$DTYPE" <<'EOF'
import json, sys
import torch
from reasonmaxxer import models
from reasonmaxxer.training.rollouts import load_rollouts
from reasonmaxxer.training.score_cache import score_all
from reasonmaxxer.training.scoring import calibrate_tau
path, target, out, dtype = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4]
meta, records = load_rollouts(path)
model = models.load_model(meta["model"]["name"], dtype=dtype)[0]
with torch.inference_mode():
    h = torch.cat([s.completion_entropy for s in score_all(model, records, keep_hidden=False)])
tau = calibrate_tau(h, target)
result = {"tau": round(tau, 4), "target_fire_rate": target, "fire_rate": float((h > round(tau, 4)).float().mean()),
          "completion_tokens": h.numel(), "sequences": len(records), "rollouts": path}
open(out, "w").write(json.dumps(result, indent=2) + "\n")
print(result)
EOF
    ;;
  gated)
    serve $M --teacher $T
    ab "base,$T:gated@$(tau)" "$AB" ;;
  random)
    rate=$(python3 - "$AB/samples.jsonl" "$T:gated@$(tau)" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.endswith("\n")]
gated = [r for r in rows if r["arm"] == sys.argv[2]]
assert len(gated) == 200, f"the gated arm has {len(gated)} of 200 answers: finish the gated stage first"
print(round(sum(len(r["fired_at"]) for r in gated) / sum(r["tokens"] for r in gated), 4))  # fired / tokens
EOF
)
    echo "random at the gated arm's measured rate $rate" | tee -a "$WORK/status.log"
    serve $M --teacher $T
    ab "base,$T:gated@$(tau),$T:random@$rate" "$AB" ;;
  alone)
    serve $T --no-bundled-adapter
    ab base "$AB-teacher-alone" ;;
  report)
    .venv/bin/reasonmaxxer ab-report "$AB" --markdown
    random_arm=$(python3 -c 'import json, sys
print(next(a["name"] for a in json.load(open(sys.argv[1]))["arms"] if ":random@" in a["name"]))' "$AB/meta.json")
    .venv/bin/reasonmaxxer ab-report "$AB" --reference "$random_arm" --markdown  # the primary result
    [[ -d $AB-teacher-alone ]] && .venv/bin/reasonmaxxer ab-report "$AB-teacher-alone" --markdown ;;
  *) echo "unknown stage $stage: calibrate, gated, random, alone or report" >&2; exit 2 ;;
esac
