"""Which backend a run uses: servers when any are configured, else llama.cpp in this process."""

from __future__ import annotations

from typing import Any

from .backend import Backend
from .options import EngineOptions
from .workspace import Workspace


def open_backend(engine_options: EngineOptions, workspace: Workspace, *, verbose: bool = False,
                 server_options: Any = None) -> Backend:
    """The backend for a command or the REPL; the caller closes it."""
    if server_options is not None and server_options.servers:
        from .server_backend import ServerBackend

        return ServerBackend(server_options, workspace.cache_dir, fallback_n_ctx=engine_options.n_ctx)
    from .local_backend import LocalBackend

    return LocalBackend(engine_options, workspace.cache_dir, verbose=verbose)
