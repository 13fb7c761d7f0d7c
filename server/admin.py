"""Adapter admin: `GET /v1/adapters` lists what is served; `POST /v1/adapters` loads a directory at run
time, `DELETE /v1/adapters/{name}` unloads one.

Policy (documented in docs/server.md): loading and unloading are off unless the server was started with at
least one `--adapter-root DIR`; then only directories under those roots load (after resolving symlinks and
`..`), whose every file is a regular file that resolves under a root too (a symlinked `adapter.json` or tensor
file pointing elsewhere is refused before anything is opened), and a path outside them is refused with one
message that says nothing about what exists on the server. A directory that fails to load gets a 400 saying
which check failed, with every quoted value from its files left out (the full message goes to the log). A
directory with a model's `config.json` and no `adapter.json` loads as a teacher (transformers backend only; on
vLLM a 400 says what to use instead). Behind `--api-key` like every route. Adapter names (from adapter.json)
use a safe character set (steering/manifest.py) and may never be the served model's id: `check_name`, also
applied at start-up.
"""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, StrictStr

from reasonmaxxer.steering.adapters import AdapterError, load_adapter

from .backends import load_teacher_for
from .serving import ApiError, json_number

__all__ = ["check_name", "router"]

router = APIRouter()
log = logging.getLogger("uvicorn.error")  # where the server's own lines go (runner.py)


class AdapterLoad(BaseModel):
    path: StrictStr


def _load(s, path: Path):
    """An adapter directory, or a model folder (config.json, no adapter.json) as a teacher."""
    if not (path / "adapter.json").is_file() and (path / "config.json").is_file():
        return load_teacher_for(s.settings, str(path))
    return load_adapter(path)


def check_name(name: str, served_name: str) -> None:
    if name == served_name:
        raise ValueError(f"adapter name {name!r} is the served model's id: rename the adapter in its adapter.json")


def _allowed(s, raw: str) -> Path:
    roots = [Path(r).resolve() for r in s.settings.adapter_roots]
    if not roots:
        raise ApiError(403, "adapter admin is off: start the server with --adapter-root DIR to load adapters from "
                       "DIR at run time", "permission_error", code="admin_disabled")
    outside = ApiError(403, "the path is not under an adapter root of this server: put the adapter in one (GET "
                       "/v1/adapters shows what is served)", "permission_error", param="path", code="outside_roots")
    try:
        path = Path(raw).resolve()
        if not _under(path, roots) or not all(_inside(f, roots) for f in path.rglob("*")):
            raise outside
    except (OSError, RuntimeError, ValueError) as e:
        raise outside from e
    return path


def _under(path: Path, roots: list[Path]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)


def _inside(entry: Path, roots: list[Path]) -> bool:
    """A directory's entry may be opened: it resolves under a root, to a directory or a regular file."""
    target = entry.resolve()
    return _under(target, roots) and (target.is_dir() or target.is_file())


def _public(message: str) -> str:
    """An error for the client: the values quoted from the adapter's files left out."""
    return re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", message)


@router.get("/v1/adapters")
async def list_adapters(request: Request) -> dict[str, Any]:
    s = request.app.state.server
    data = []
    for name, adapter in sorted(s.engine.adapters.items()):
        m = adapter.manifest
        data.append({"id": name, "object": "adapter", "kind": m.kind, "path": s.adapter_paths.get(name),
                     "tau": json_number(m.gate.tau), "top_k": m.top_k, "measured_fire_rate": m.gate.measured_fire_rate,
                     "base_model": s.served_name if m.kind == "teacher" else m.base_model.name})
    return {"object": "list", "data": data}


@router.post("/v1/adapters", status_code=201)
async def load_adapter_route(body: AdapterLoad, request: Request) -> dict[str, Any]:
    s = request.app.state.server
    path = await asyncio.to_thread(_allowed, s, body.path)
    try:
        adapter = await asyncio.to_thread(_load, s, path)
        check_name(adapter.name, s.served_name)
        await asyncio.to_thread(s.engine.add_adapter, adapter)
    except (AdapterError, ValueError) as e:
        log.warning("POST /v1/adapters %s: %s", path, e)
        raise ApiError(400, _public(str(e)), param="path", code="invalid_adapter") from e
    except OSError as e:  # under a root: say what went wrong, without a traceback
        raise ApiError(400, f"the adapter could not be read: {e.strerror or e}", param="path") from e
    s.adapter_paths[adapter.name] = str(path)
    return {"id": adapter.name, "object": "adapter", "kind": adapter.manifest.kind, "loaded": True}


@router.delete("/v1/adapters/{name}")
async def unload_adapter(name: str, request: Request) -> dict[str, Any]:
    s = request.app.state.server
    if not s.settings.adapter_roots:
        raise ApiError(403, "adapter admin is off: start the server with --adapter-root DIR to manage adapters at "
                       "run time", "permission_error", code="admin_disabled")
    try:
        s.engine.remove_adapter(name)
    except KeyError as e:
        raise ApiError(404, f"no adapter named '{name}' is loaded", code="adapter_not_found") from e
    s.adapter_paths.pop(name, None)
    return {"id": name, "object": "adapter", "deleted": True}
