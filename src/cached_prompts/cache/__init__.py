"""The on-disk store of prelude states in llm_cache/ (store): entries keyed by model and state
settings, checked before use, evicted least recently used. May import: errors, options, fs, backend."""
