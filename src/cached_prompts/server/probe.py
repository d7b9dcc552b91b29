"""Which protocol a server speaks, found once when it is first reached (`--server-api`)."""

from __future__ import annotations

from cached_prompts.options import ServerApiName
from cached_prompts.server.api import ServerApi
from cached_prompts.server.http import HttpConnection
from cached_prompts.server.llama_api import probe_llama_server
from cached_prompts.server.openai_api import probe_openai_server


def probe(http: HttpConnection, api: ServerApiName) -> ServerApi:
    """The server's client: `llama` llama-server's /completion, `openai` /v1/completions,
    `auto` llama-server's if the server answers /props."""
    if api != "openai":
        found = probe_llama_server(http, missing_ok=api == "auto")
        if found is not None:
            return found
    return probe_openai_server(http)
