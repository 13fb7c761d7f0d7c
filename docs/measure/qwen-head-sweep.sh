#!/usr/bin/env bash
# Head schedules on the 50-problem GSM8K rollouts of docs/measure/qwen-gpu.sh, scored once (--score-cache),
# then refitted in seconds each. Prints how each moved log p at decision points on its training rollouts
# (positive / negative advantage) and the KL to base elsewhere. Run on the CPU: 9 min of scoring, then ~20 s
# per schedule. FIT (default out/qwen-gpu) holds rollouts.jsonl; adapters go to FIT/sweep/.
set -euo pipefail
cd "$(dirname "$0")/../.."
FIT=${FIT:-out/qwen-gpu}
RM=${RM:-.venv/bin/reasonmaxxer}
mkdir -p "$FIT/sweep"
printf '%-34s %9s %9s %8s\n' schedule "pos" "neg" "KL"
while read -r name flags; do
  out="$FIT/sweep/$name"
  [[ -f $out/adapter.json ]] || $RM fit --device cpu --model qwen2.5-coder-0.5b-instruct --rollouts "$FIT/rollouts.jsonl" \
    --kind head --name "qwen05-gsm8k-head-$name" --rank 32 --accumulation 8 --warmup 50 --target-fire-rate 0.03 \
    --score-cache "$FIT/score-cache" $flags --out "$out" > "$out.log" 2>&1
  python3 - "$out/adapter.json" "$name" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))["provenance"]["data"]["diagnostics"]
print(f"{sys.argv[2]:<34} {d['logp_shift_positive']:+9.3f} {d['logp_shift_negative']:+9.3f} {d['anchor_kl']:8.4f}")
PY
done <<'GRID'
lr1e-4-e1 --lr 0.0001 --epochs 1
lr1e-4-e3 --lr 0.0001 --epochs 3
lr2e-4-e1 --lr 0.0002 --epochs 1
lr3e-4-e1 --lr 0.0003 --epochs 1
lr3e-4-e1-clip1 --lr 0.0003 --epochs 1 --adv-clip 1.0
lr3e-4-e1-kl1 --lr 0.0003 --epochs 1 --kl-weight 1.0
lr3e-4-e3-clip1-kl1 --lr 0.0003 --epochs 3 --adv-clip 1.0 --kl-weight 1.0
lr1e-3-e1-clip1-kl1 --lr 0.001 --epochs 1 --adv-clip 1.0 --kl-weight 1.0
GRID
