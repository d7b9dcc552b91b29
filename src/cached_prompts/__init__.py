"""cached-prompts: a prompt-development workbench for llama.cpp models that keeps each prelude's
model state (KV cache) on disk and starts every later request from it.

The library face. Everything the CLI, the REPL and the report do goes through these names:

    from cached_prompts import EngineOptions, SamplingOptions, Workspace, open_backend
    with open_backend(EngineOptions(), Workspace(Path("."))) as backend:
        ...

Layers, from the ground up (a package imports only from its own layer and those below;
tests/test_layers.py enforces it):

    errors, options            the exception family; the one options model
    fs/                        bounded regular-file reads, atomic writes, locks
    backend/                   the Backend interface and its request/answer types
    cache/                     the on-disk store of prelude states
    local/, server/            the two kinds of backend: llama.cpp (in a worker process, or in this
                               one), HTTP servers
    workspace/                 the workspace's folders, output sets and their freshness, records
    method/                    chat formats, promote, scoring, init, structured-output constraints
    commands/                  the workspace commands as library functions
    repl/, report/             the JSON service; the HTML report
    cli/                       argument parsing and messages: the only place errors become text

Names that need llama.cpp (`LocalBackend`) are imported lazily, so a program that only talks to
servers never loads it.
"""

from __future__ import annotations

from typing import Any

from cached_prompts.backend.interface import (Backend, BackendKind, Completion, GenerationRequest,
                                              PreludeKind, PreludeSource, PromptJob)
from cached_prompts.errors import CachedPromptsError
from cached_prompts.options import EngineOptions, SamplingOptions, ServerOptions
from cached_prompts.version import __version__
from cached_prompts.workspace.layout import Workspace
from cached_prompts.workspace.outputs import OutputSet

__all__ = [
    "__version__",
    "Backend", "BackendKind", "Completion", "GenerationRequest", "PreludeKind", "PreludeSource", "PromptJob",
    "CachedPromptsError",
    "EngineOptions", "SamplingOptions", "ServerOptions",
    "Workspace", "OutputSet",
    "LocalBackend", "WorkerBackend", "ServerBackend", "open_backend",
]

_LAZY = {
    "LocalBackend": ("cached_prompts.local.backend", "LocalBackend"),
    "WorkerBackend": ("cached_prompts.local.worker", "WorkerBackend"),
    "ServerBackend": ("cached_prompts.server.backend", "ServerBackend"),
    "open_backend": ("cached_prompts.commands.choose_backend", "open_backend"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attribute = _LAZY[name]
        return getattr(importlib.import_module(module), attribute)
    raise AttributeError(f"module 'cached_prompts' has no attribute {name!r}")
