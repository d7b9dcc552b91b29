"""Which backend a run uses: servers when any are configured, else the local engine: llama.cpp
in a worker process (local/worker.py: a crash in C is an error, not the end of the run), or in
this process with `--lp-engine-process in-process` or `in_process=True`."""

from __future__ import annotations

import logging
from typing import Any

from cached_prompts.backend.interface import Backend
from cached_prompts.options import EngineOptions
from cached_prompts.workspace.layout import Workspace

log = logging.getLogger(__name__)

# Engine options that only llama.cpp in this process reads: a server has its own.
LOCAL_ENGINE_ONLY = frozenset({"model_path", "n_threads", "n_batch", "n_ubatch", "n_gpu_layers", "kv_type",
                               "engine_process", "draft", "repack"})


def engine_flag(name: str) -> str:
    """The command-line flag of an EngineOptions field."""
    return EngineOptions.model_fields[name].json_schema_extra["flag"]


def open_backend(engine_options: EngineOptions, workspace: Workspace, *, verbose: bool = False,
                 server_options: Any = None, in_process: bool = False) -> Backend:
    """The backend for a command or the REPL; the caller closes it. `in_process`: the
    LocalBackend itself (for what needs its internals, such as score-preludes)."""
    if server_options is not None and server_options.servers:
        from cached_prompts.server.backend import ServerBackend

        ignored = sorted(LOCAL_ENGINE_ONLY & engine_options.model_fields_set)
        if ignored:
            log.warning("%s set the local engine only; the servers use their own settings (set them "
                        "where each server starts)", ", ".join(engine_flag(name) for name in ignored))

        return ServerBackend(server_options, workspace.cache_dir, fallback_n_ctx=engine_options.n_ctx)
    if in_process or engine_options.engine_process == "in-process":
        from cached_prompts.local.backend import LocalBackend

        return LocalBackend(engine_options, workspace.cache_dir, verbose=verbose)
    from cached_prompts.local.worker import WorkerBackend

    return WorkerBackend(engine_options, workspace.cache_dir, verbose=verbose)
