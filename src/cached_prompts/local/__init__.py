"""llama.cpp in this process: the resource-owning wrappers (engine: one owner per C handle), the
model architecture (architecture), the model file (model_file), the decode loop (generation),
prelude states (prelude_state) and the `LocalBackend` (backend). The only package that calls
llama.cpp. May import: errors, options, fs, backend, cache."""
