# Sourced by the CPU measurement scripts (run from the repository root).
# add_heads: each adapter folder in $HEADS is served (appended to EXTRA) and run gated under its registered
# name (appended to ARMS).
add_heads() {
  local dir
  for dir in ${HEADS:-}; do
    ARMS="$ARMS,$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["name"])' "$dir/adapter.json"):gated"
    EXTRA+=(--adapter "$dir")
  done
}

# serve_vllm PORT LOG [serve flags...]: start `reasonmaxxer serve --backend vllm` in the background, stop it
# when the script exits, and wait until it answers /health (failing if it dies first).
serve_vllm() {
  local port=$1 log=$2
  shift 2
  .venv-vllm/bin/reasonmaxxer serve --backend vllm --port "$port" --max-model-len 2048 --max-batch-size 32 \
    --log-level warning "$@" > "$log" 2>&1 &
  SERVER=$!
  trap 'kill $SERVER' EXIT
  until curl -sf "localhost:$port/health" > /dev/null; do kill -0 $SERVER; sleep 5; done
}
