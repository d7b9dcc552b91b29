"""llama.cpp: the resource-owning wrappers (engine: one owner per C handle), the model
architecture (architecture), the model file (model_file), the decode loop (generation),
prelude states (prelude_state), the `LocalBackend` (backend: in this process), the bounds on
grammars (grammar_limits) and the `WorkerBackend` (worker, worker_main, worker_protocol,
activity: the LocalBackend in a worker process, so a crash in C is an error). The only package
that calls llama.cpp. May import: errors, options, fs, backend, cache."""
