"""llama-server and OpenAI-compatible (vLLM) servers behind the `Backend` interface: the HTTP
connection with bounded answers (http), the validated answers (responses), one client class per
protocol behind one small interface (api; llama_api, openai_api; chosen by probe), which server
takes which output (routing), the index of prelude slots (index) and the `ServerBackend`
(backend). May import: errors, options, fs, backend."""
