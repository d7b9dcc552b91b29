"""llama-server and OpenAI-compatible (vLLM) servers behind the `Backend` interface: the HTTP
clients (api), which server takes which output (routing), the index of prelude slots (index) and
the `ServerBackend` (backend). May import: errors, options, fs, backend."""
