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

# serve_with REASONMAXXER PORT LOG [serve flags...]: start `REASONMAXXER serve` (the CLI of a venv) in the
# background, stop it when the script exits, and wait until it answers /health (failing if it dies first).
serve_with() {
  local cli=$1 port=$2 log=$3
  shift 3
  "$cli" serve --port "$port" "$@" > "$log" 2>&1 &
  SERVER=$!
  [[ -n ${TRACKED:-} ]] || trap 'kill $SERVER' EXIT  # else end_stage stops it
  until curl -sf "localhost:$port/health" > /dev/null; do kill -0 $SERVER; sleep 5; done
}

# serve_vllm PORT LOG [serve flags...]: serve_with the vLLM backend (its venv, its CPU settings).
serve_vllm() {
  local port=$1 log=$2
  shift 2
  serve_with .venv-vllm/bin/reasonmaxxer "$port" "$log" --backend vllm --max-model-len 2048 --max-batch-size 32 \
    --log-level warning "$@"
}

# track_stage WORK STAGE: log the stage's start and end (its exit code) in WORK/status.log; with COMMIT_EVERY=SECONDS,
# commit WORK that often while the stage runs and once more when it ends (only what is committed survives a new
# machine). Commits name WORK's paths only, so work staged elsewhere in the tree stays out of them.
track_stage() {
  local work=$1 stage=$2
  mkdir -p "$work"
  echo "$(date -u +%FT%TZ) $stage started: $*" >> "$work/status.log"
  if [[ -n ${COMMIT_EVERY:-} ]]; then
    ( while sleep "$COMMIT_EVERY"; do commit_work "$work" "$stage: progress"; done ) &
    COMMITTER=$!
  fi
  TRACKED=1
  # shellcheck disable=SC2064  # expand work and stage now: they are this function's locals
  trap "end_stage '$work' '$stage' \$?" EXIT
}

end_stage() {
  local work=$1 stage=$2 rc=$3
  [[ -n ${SERVER:-} ]] && kill "$SERVER" 2> /dev/null
  [[ -n ${COMMITTER:-} ]] && kill "$COMMITTER" 2> /dev/null
  echo "$(date -u +%FT%TZ) $stage ended: exit $rc" >> "$work/status.log"
  [[ -n ${COMMIT_EVERY:-} ]] && commit_work "$work" "$stage: exit $rc"
  return 0
}

# commit_work WORK MESSAGE: commit WORK's files (retrying while another git command holds the index).
commit_work() {
  local try
  for try in 1 2 3 4 5; do
    if git add -- "$1" && git commit -q -m "runs/$(basename "$1"): $2" -- "$1"; then return 0; fi
    git diff --quiet HEAD -- "$1" && [[ -z $(git ls-files --others --exclude-standard -- "$1") ]] && return 0
    sleep 5
  done
}
