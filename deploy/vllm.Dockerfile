# vLLM's OpenAI image with the reasonmaxxer plugin and logits processor (GPUs; the stock server that
# production-stack, llm-d and KServe's LLMInferenceService run). Steering travels in `vllm_xargs`; /metrics counts
# the gate (reasonmaxxer_gate_fired_tokens_total, reasonmaxxer_generated_tokens_total). See docs/vllm.md.
#   docker build -f deploy/vllm.Dockerfile -t reasonmaxxer-vllm .
#   docker run --gpus all -p 8000:8000 -v /path/to/adapters:/adapters reasonmaxxer-vllm --model Qwen/Qwen2.5-1.5B-Instruct
ARG VLLM_IMAGE=vllm/vllm-openai:v0.34.0
FROM ${VLLM_IMAGE}

WORKDIR /opt/reasonmaxxer
COPY pyproject.toml README.md ./
COPY reasonmaxxer ./reasonmaxxer
COPY steering ./steering
COPY training ./training
COPY server ./server
COPY clients ./clients
COPY deploy/vllm-serve.sh /usr/local/bin/reasonmaxxer-vllm-serve
# The plugin needs only what vLLM's image has (torch, safetensors, pyzmq, prometheus_client): keep its vLLM and torch.
RUN pip install --no-cache-dir --no-deps . \
    && python3 -c "from reasonmaxxer.steering.vllm import check_vllm_version; print('vllm', check_vllm_version())"

ENTRYPOINT ["reasonmaxxer-vllm-serve"]
